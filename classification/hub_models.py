"""Backbones by name from other packages: ``--model.backbone timm:<name>`` and ``pretrainedmodels:<name>``.

Each prefix is a *model source* of the registry (``classification.registry.register_model_source``): the first time a
name is looked up, its source builds its :class:`~classification.registry.ModelSpec` from the package's own facts
and registers it, so everything that works with a built-in backbone (fit/validate/test/measure/profile/benchmark/
report, run directories, the methods, recompute, the accounting) works with it.

From the package, per architecture:

* the **architecture**, built with random weights (``timm.create_model(name)``;
  ``pretrainedmodels.<name>(num_classes=1000, pretrained=None)``);
* the **head**: timm's ``pretrained_cfg["classifier"]`` (replaced with timm's own ``reset_classifier``);
  pretrainedmodels' ``last_linear``; a model whose head is not one ``nn.Linear`` (a conv head, DeiT's two distilled
  heads, DPN, SqueezeNet) is refused when its name is looked up, saying so;
* the **preprocessing**: mean, std and input size (timm's pretrained config; pretrainedmodels'
  ``pretrained_settings[name]["imagenet"]``, which the authors used for their segmentation encoders). The command line
  hands them to the data (``--data.mean``/``--data.std`` when not given, ``--data.resolution`` when left at its
  default 224). pretrainedmodels' Caffe-style models (``input_range`` [0, 255], ``input_space`` BGR) are served
  exactly: the mean and std are rescaled to [0, 1] inputs and the network reverses the channels first (a forward
  pre-hook: no parameter, module names unchanged);
* the **layers** ``--model.num_finetune`` counts: the model's Conv2d layers, or, for a network with more linear than
  conv layers (ViTs, Swin; not timm's ConvNeXt, whose MLPs are 1x1 convs), its linears, those named ``*mlp*`` when it has such (the paper's choice for
  transformers): always ``asi_core.candidate_layers(model, layer_type, include)``.

**Weights**, resolved as the built-in models' are (local file, else the published weights, else a message naming the
file to put where and ``--model.pretrained false``):

* timm: ``<ckpt_dir>/timm/<name>.safetensors`` (or ``.pth``/``.bin``), loaded through timm's own loader (its key
  filters apply), else timm's published weights from the Hugging Face hub (``pretrained_cfg["hf_hub_id"]``);
* pretrainedmodels: ``<ckpt_dir>/imagenet/<file name of its url>``, else that url, downloaded there
  (``classification.backbones.load_imagenet_weights``); the torchvision-derived models' ``fc.*`` keys become
  ``last_linear.*``, as pretrainedmodels itself renames them.
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .registry import register_model, register_model_source
from .weights import ckpt_dir

TIMM_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")


def layer_choice(model: nn.Module) -> tuple[str, Optional[str]]:
    """What ``--model.num_finetune`` counts in a network from another package (module docstring)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if convs >= len(linears):
        return "conv", None
    return "linear", ("mlp" if any("mlp" in n for n in linears) else None)


def _probe(build) -> nn.Module:
    """The architecture for its module tree and configuration only: built on the meta device (no memory, no
    initialisation arithmetic; a ViT-H costs nothing), or normally where the builder needs real numbers (some compute
    drop-path rates with ``.item()``)."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        return build()


def _submodule(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _unknown(source: str, name: str, known: list[str], listing: str) -> ValueError:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    return ValueError(f"{source} has no model {name!r}" + (f"; close names: {', '.join(near)}" if near else "")
                      + f" ({listing})")


# ----------------------------------------------------------------------------- timm
def timm_weights_file(name: str) -> Path:
    """The local weights file of ``timm:<name>`` (the first that exists, else the .safetensors name to create)."""
    folder = ckpt_dir() / "timm"
    for suffix in TIMM_WEIGHT_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return folder / f"{name}.safetensors"


def _timm_create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """timm's own builder (its own function so tests can simulate being offline)."""
    import timm

    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _timm_pretrained(name: str) -> nn.Module:
    local = timm_weights_file(name)
    if local.is_file():
        try:
            return _timm_create(name, True, pretrained_cfg_overlay={"file": str(local)})
        except Exception as err:
            raise ValueError(f"timm weights file {local} for model timm:{name} is unreadable or does not fit the "
                             f"architecture ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                             f"). Delete it or put a good copy there") from None
    cfg = _probe(lambda: _timm_create(name, False)).pretrained_cfg
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise FileNotFoundError(f"timm publishes no pretrained weights for {name} (its pretrained config names none) "
                                f"and there is no local file {local}: put a state_dict there, or pass "
                                f"--model.pretrained false to train from random weights on purpose")
    try:
        return _timm_create(name, True)
    except Exception as err:  # offline, HTTP error ...
        hub = cfg.get("hf_hub_id") or cfg.get("url")
        raise FileNotFoundError(
            f"pretrained weights for --model.backbone timm:{name} are not available: no local file {local} and "
            f"timm's download of {hub} failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}).\n"
            f"Fix: on a machine with internet, `hf download {hub} model.safetensors` and put the file at {local} "
            f"(or set ASI_CKPT_DIR to the folder holding timm/{local.name}); or pass --model.pretrained false to "
            f"train from random weights on purpose.") from err


def resolve_timm(name: str) -> None:
    """Register ``timm:<name>`` (called by the registry on first lookup)."""
    try:
        import timm
    except ImportError:
        raise ValueError("--model.backbone timm:... needs timm: pip install timm (make setup installs it)") from None
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models() lists them")
    probe = _probe(lambda: _timm_create(name, False))
    cfg = probe.pretrained_cfg
    head = cfg.get("classifier")
    if isinstance(head, (list, tuple)):  # distilled models (DeiT/LeViT "distilled"): two heads averaged
        raise ValueError(f"timm:{name} has {len(head)} classifier heads ({', '.join(head)}), which this framework does "
                         f"not train together; choose a model with one head (e.g. the non-distilled variant)")
    # (an Identity head: a checkpoint published without classifier, e.g. ViT-H; reset_classifier makes the Linear)
    if not head or not isinstance(_submodule(probe, head), (nn.Linear, nn.Identity)):
        raise ValueError(f"timm:{name}'s classifier {head!r} is not one nn.Linear "
                         f"({type(_submodule(probe, head)).__name__ if head else 'none in its pretrained config'}): "
                         f"not supported as a backbone here (a conv head would count as a fine-tuned layer)")
    layer_type, include = layer_choice(probe)
    input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    # ViT-style patch embeddings refuse another image size (their position embeddings): say so before any work
    strict = getattr(getattr(probe, "patch_embed", None), "strict_img_size", False) is True

    def create(num_classes: int, pretrained: bool, **options) -> nn.Module:
        if options:
            raise ValueError(f"model timm:{name} takes no options {sorted(options)} (they are for the LLM backbones)")
        model = _timm_pretrained(name) if pretrained else _timm_create(name, False)
        model.reset_classifier(num_classes)  # timm's own head replacement (a fresh num_classes linear)
        return model

    register_model(f"timm:{name}", builder=lambda: _timm_create(name, False), head=head,
                   weights_url=cfg.get("hf_hub_id") or "", weights_file=timm_weights_file(name).name,
                   resolution=input_size, layer_type=layer_type, include=include,
                   fixed_resolution=input_size if strict else None,
                   preprocessing={"mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
                                  "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
                                  "input_size": input_size})(create)


# ----------------------------------------------------------------------------- pretrainedmodels
def _pm_settings(name: str) -> dict:
    import pretrainedmodels

    settings = pretrainedmodels.pretrained_settings[name]
    return settings["imagenet"] if "imagenet" in settings else next(iter(settings.values()))


def _pm_build(name: str) -> nn.Module:
    with warnings.catch_warnings():  # its torchvision-derived models pass torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore")
        import pretrainedmodels

        model = pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)
    if _pm_settings(name).get("input_space") == "BGR":
        model.register_forward_pre_hook(_rgb_to_bgr)
    return model


def _rgb_to_bgr(module: nn.Module, args):
    return (args[0].flip(1), *args[1:])


def _pm_rename(state: dict, model: nn.Module) -> dict:
    """pretrainedmodels' torchvision-derived models load torchvision's file, whose head is ``fc``/``classifier``,
    then rename it ``last_linear``: the same renaming here. A file with 1001 classes (a background class first:
    Inception-v4, Inception-ResNet-v2, NASNet-L, PNASNet) loses that row, as pretrainedmodels drops it."""
    own = model.state_dict()
    if "last_linear.weight" in own and "last_linear.weight" not in state:
        for old in ("fc", "classifier"):
            if f"{old}.weight" in state and f"{old}.weight" not in own:
                state = {("last_linear" + k[len(old):] if k.split(".")[0] == old else k): v for k, v in state.items()}
                break
    for key in ("last_linear.weight", "last_linear.bias"):
        if key in state and key in own and state[key].shape[0] == own[key].shape[0] + 1:
            state = {**state, key: state[key][1:]}
    return state


def resolve_pretrainedmodels(name: str) -> None:
    """Register ``pretrainedmodels:<name>`` (called by the registry on first lookup)."""
    try:
        import pretrainedmodels
    except ImportError:
        raise ValueError("--model.backbone pretrainedmodels:... needs pretrainedmodels: pip install "
                         "pretrainedmodels (make setup installs it)") from None
    if name not in pretrainedmodels.model_names:
        raise _unknown("pretrainedmodels", name, list(pretrainedmodels.model_names),
                       "pretrainedmodels.model_names lists them")
    from .backbones import register_classifier

    s = _pm_settings(name)
    scale = 255.0 if list(s.get("input_range", [0, 1]))[-1] == 255 else 1.0
    order = slice(None, None, -1) if s.get("input_space") == "BGR" else slice(None)
    probe = _probe(lambda: _pm_build(name))
    if not isinstance(getattr(probe, "last_linear", None), nn.Linear):
        raise ValueError(f"pretrainedmodels:{name}'s classifier is not one nn.Linear named last_linear "
                         f"({type(getattr(probe, 'last_linear', None)).__name__}): not supported as a backbone here")
    layer_type, include = layer_choice(probe)
    register_classifier(f"pretrainedmodels:{name}", lambda: _pm_build(name), "last_linear", s["url"],
                        s["url"].rsplit("/", 1)[-1], int(s["input_size"][-1]), layer_type=layer_type,
                        include=include, weights_rename=_pm_rename,
                        preprocessing={"mean": [float(v) / scale for v in s["mean"]][order],
                                       "std": [float(v) / scale for v in s["std"]][order],
                                       "input_size": int(s["input_size"][-1])})


register_model_source("timm", resolve_timm, "any model of timm.list_models(), e.g. timm:resnet18")
register_model_source("pretrainedmodels", resolve_pretrainedmodels,
                      "any of pretrainedmodels.model_names, e.g. pretrainedmodels:se_resnet50")
