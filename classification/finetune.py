"""The fine-tuning core every family shares, as small steps the LightningModule calls in order::

    check_options -> build -> load_weights -> add_adapters -> choose_layers -> patch_layers -> freeze
                  -> enable_recompute -> apply_norm_policy -> micro_batch_prefix -> approximate_region
                                                                      (then, in training: configure_optimizers)

Each step reads the module's hyper-parameters (``hp``: the ``--model.*`` options) and the model spec (``spec``:
the family's hooks, classification/registry.py) and names no family, task, dataset or method: what differs is
asked of the spec (``options``, ``layer_sets``, ``fixed_resolution``), of the network (``freeze_unpatched``) or of
the method registry (``asi_core.METHODS`` and LoRA below: options, checks, data dependence, rank selection).

The optimiser recipes are those of the paper (App. B.1): SGD (lr 0.05, momentum 0 on downstream sets; lr 0.005,
momentum 0.9, 4 warm-up epochs on ImageNet setup B), weight decay 1e-4, cosine annealing; L2 gradient clipping 2.0
is the Trainer's ``gradient_clip_val``.
"""
from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, List, Optional, Union

import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

import asi_core
import asi_core.ranks as ranks_lib
from asi_core.approx import SAVED_BITS
from asi_core.methods import NamesView, Option, _is_int

from .registry import ModelSpec, create_model, get_spec

ASI_DEFAULT_RANKS = 4  # --model.ranks when neither ranks nor a perplexity file is given
_BN = nn.modules.batchnorm._BatchNorm


class RandomBackboneWarning(UserWarning):
    """Fine-tuning a few layers on top of a random, frozen backbone (profile/benchmark do it on purpose and
    silence this category)."""


# ----------------------------------------------------------------------------- methods the command line runs
class LoRA:
    """``--model.method lora``: peft LoRA adapters on the fine-tuned linears, trained as they are (their ``lora_A``
    inputs kept whole: vanilla). With ``--model.lora true`` any of ``composes`` compresses those inputs instead.
    Not an activation-compression method (no ``asi_core`` Method): it carries the same facts the framework asks of
    one (options, label, run-name token, ...)."""

    name = "lora"
    compress = "vanilla"  # the asi_core method on the lora_A linears
    composes = ("vanilla", "hosvd", "asi")  # the compressions --model.lora true adds adapters to
    user_options: dict[str, Option] = {}
    label = "LoRA"
    report_order = 60
    lean_default = True  # as profile has always reported it
    accounting = "input"
    data_dependent = False
    rank_selection = False

    @classmethod
    def check_user_options(cls, values) -> list:
        return []

    @classmethod
    def report_label(cls, options) -> tuple[str, tuple]:
        return f"LoRA (r = {options.get('lora_rank')})", ()

    @classmethod
    def run_name(cls, options) -> str:
        return ""


FRAMEWORK_METHODS: dict[str, type] = {"lora": LoRA}


# --model.method's choices: asi_core's registered methods (live: @asi_core.register_method adds one), then the
# framework's (LoRA)
MODEL_METHODS = NamesView(lambda: (*asi_core.METHODS, *FRAMEWORK_METHODS))


def method_info(name: str):
    """The class that knows method ``name`` (its options, checks, label, run-name token): asi_core's registry or
    the framework's LoRA. ValueError listing the valid names otherwise."""
    if name in FRAMEWORK_METHODS:
        return FRAMEWORK_METHODS[name]
    if name in asi_core.METHODS:
        return asi_core.get_method(name)
    raise ValueError(f"Unknown method {name!r}; valid choices: {', '.join(MODEL_METHODS)}")


def user_option_defaults() -> dict[str, Any]:
    """Every method option a user can set (--model.<name>) with its default, over all registered methods."""
    out: dict[str, Any] = {}
    for name in MODEL_METHODS:
        for option, spec in method_info(name).user_options.items():
            out.setdefault(option, spec.default)
    return out


# ----------------------------------------------------------------------------- 0. options
def check_model_options(method: str = "vanilla", num_finetune="all", lr: float = 0.05, momentum: float = 0.0,
                        weight_decay: float = 1e-4, warmup_epochs: int = 0, frozen_micro_batch=None,
                        lora_rank: int = 8, lora_alpha: float = 16.0, saved_bits=None, approx_activations=False,
                        **options) -> list[str]:
    """Check the numbers of the model options before anything is built: ValueError naming the option, the value and
    the valid range (the method's own options by its ``user_options``). Returns warnings for method options set away
    from their default that ``method`` ignores."""
    def bad(option, value, valid):
        raise ValueError(f"--model.{option} {value!r} is invalid: {valid}")

    if num_finetune != "all" and (not _is_int(num_finetune) or num_finetune < 1):
        bad("num_finetune", num_finetune, "it must be an integer >= 1 or 'all'")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr) and lr > 0):
        bad("lr", lr, "it must be a finite number > 0")
    if not isinstance(momentum, (int, float)) or not (0 <= momentum < 1):
        bad("momentum", momentum, "it must be in [0, 1)")
    if not isinstance(weight_decay, (int, float)) or not (math.isfinite(weight_decay) and weight_decay >= 0):
        bad("weight_decay", weight_decay, "it must be a finite number >= 0")
    if not _is_int(warmup_epochs) or warmup_epochs < 0:
        bad("warmup_epochs", warmup_epochs, "it must be an integer >= 0")
    if not _is_int(lora_rank) or lora_rank < 1:
        bad("lora_rank", lora_rank, "it must be an integer >= 1 (the LoRA rank r)")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not (
            math.isfinite(lora_alpha) and lora_alpha > 0):
        bad("lora_alpha", lora_alpha, "it must be a finite number > 0 (the update is alpha / r * B A x)")
    if frozen_micro_batch is not None and (not _is_int(frozen_micro_batch) or frozen_micro_batch < 1):
        bad("frozen_micro_batch", frozen_micro_batch, "it must be an integer >= 1 (samples per micro-batch of the "
            "frozen prefix) or null (the whole batch at once)")
    if saved_bits is not None and (not _is_int(saved_bits) or saved_bits not in SAVED_BITS):
        bad("saved_bits", saved_bits, f"it must be one of {', '.join(map(str, SAVED_BITS))} (bits per element of "
            f"what autograd saves in the fine-tuned region, asi_core.approx) or null (kept exactly)")
    if not isinstance(approx_activations, bool):
        bad("approx_activations", approx_activations, "it must be true (GELU/SiLU backward from a 2-bit derivative, "
            "asi_core.approx) or false (exact)")
    info = method_info(method) if method in MODEL_METHODS else None
    for option, value, valid in (info.check_user_options(options) if info else []):
        bad(option, value, valid)
    warnings_ = []
    for option, default in user_option_defaults().items():
        if option in options and (info is None or option not in info.user_options) and options[option] != default:
            owners = [m for m in MODEL_METHODS if option in method_info(m).user_options]
            warnings_.append(f"--model.{option} {options[option]!r} is ignored by --model.method {method} (it "
                             f"applies to {', '.join(owners)})")
    return warnings_


def check_options(hp, models: dict[str, ModelSpec]) -> list[str]:
    """Every check that needs no network, in the order a user meets them (the method, the numbers, then what the
    model spec says); returns the warnings to show. ``models``: the model registry (a family option given to a
    backbone whose family does not take it is refused, naming the backbones that do)."""
    if hp.method not in MODEL_METHODS:
        raise ValueError(f"Unknown method {hp.method!r}; valid choices: {', '.join(MODEL_METHODS)}")
    messages = check_model_options(**dict(hp))
    spec = get_spec(hp.backbone)
    if hp.checkpointing and hp.recompute:
        raise ValueError("--model.checkpointing and --model.recompute both recompute the fine-tuned region; "
                         "choose one (checkpointing: whole blocks, patched layers included; recompute: only "
                         "the parts without a patched layer)")
    shape = hp.input_shape
    if spec.fixed_resolution is not None and shape is not None and tuple(shape[-2:]) != (spec.fixed_resolution,) * 2:
        raise ValueError(f"{hp.backbone} takes {spec.fixed_resolution}x{spec.fixed_resolution} inputs only (its "
                         f"position embeddings), got --data.resolution {shape[-1]}; pass "
                         f"--data.resolution {spec.fixed_resolution}")
    if hp.shape_only and method_info(hp.method).data_dependent:
        raise ValueError(f"shape-only execution (--model.shape_only, profile's default for LLMs) cannot make a "
                         f"data-dependent choice, and {hp.method}'s ranks come from the data: pass --model.shape_only "
                         f"false (a real step with random weights) or profile asi with --model.ranks")
    family_options = dict.fromkeys(k for other in models.values() for k in other.options)
    foreign = [k for k in family_options if k not in spec.options and hp.get(k) is not None and hp.get(k) is not False]
    if foreign:
        owners = [n for n, other in models.items() if set(foreign) <= set(other.options)]
        names = ", ".join(family_options)
        raise ValueError(f"--model.{names} are for the backbones whose family takes them ({', '.join(owners)}), not "
                         f"{hp.backbone} (given: {', '.join(foreign)})")
    return messages


# ----------------------------------------------------------------------------- 1. build
def build(hp, spec: ModelSpec) -> nn.Module:
    """The network with its head, from the family's ``create`` (its own options from ``spec.options``); warns when a
    random backbone would be fine-tuned frozen."""
    family = {k: hp.get(k) for k in spec.options}
    net = create_model(hp.backbone, hp.num_classes, pretrained=hp.pretrained and hp.checkpoint is None, **family)
    has_bn = any(isinstance(m, _BN) for m in net.modules())
    if not hp.pretrained and hp.checkpoint is None and (hp.num_finetune != "all" or (hp.set_bn_eval and has_bn)):
        why = []
        if hp.num_finetune != "all":
            why.append(f"only the last {hp.num_finetune} layer(s) and the head learn, on top of a randomly "
                       f"initialised and frozen backbone")
        if hp.set_bn_eval and has_bn:
            why.append("BatchNorm stays in eval mode with its initial statistics, so the features shrink layer "
                       "by layer (to ~1e-10) and are nearly the same for every input")
        rank_zero_warn(
            "--model.pretrained false and no --model.checkpoint: " + "; ".join(why) + ". Expect chance accuracy. "
            "Train from scratch with --model.num_finetune all --model.set_bn_eval false, or fine-tune from "
            "pretrained weights (--model.pretrained true, or a setup-B --model.checkpoint)",
            category=RandomBackboneWarning)
    return net


# ----------------------------------------------------------------------------- 2. weights
def load_weights(net: nn.Module, hp, spec: ModelSpec) -> None:
    """Setup B and segmentation: start from ``--model.checkpoint`` (the head is reused when it fits)."""
    if hp.checkpoint is not None:
        load_checkpoint_weights(net, hp.checkpoint, spec.head)


def load_checkpoint_file(path: str | Path, what: str = "--model.checkpoint"):
    """``torch.load`` of a user-given checkpoint, with errors that name the file and the option it came from.

    Plain tensors first (``weights_only``); older Lightning checkpoints pickle hyper-parameter objects, so a file
    that only loads fully is accepted too (a local file the user named). A missing, truncated or foreign file
    raises FileNotFoundError / ValueError saying which file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with contextlib.suppress(Exception):  # not plain tensors: try the full unpickler below
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{what} {path} ({path.stat().st_size} bytes) is not a readable PyTorch checkpoint: it is "
                         f"truncated, corrupt or another kind of file ({type(err).__name__}: {first}). Re-create or "
                         f"re-download it, or point {what} to another file") from None


def _torch_load(path: str | Path):
    return load_checkpoint_file(path, "--model.checkpoint")


def load_checkpoint_weights(net: nn.Module, path: str | Path, head: str) -> list[str]:
    """Load the weights of a pretraining checkpoint into ``net``; return the keys that were skipped.

    Accepts a Lightning checkpoint of this project (keys ``net.*``), one exported to ckpts/ by a
    setup-B pretraining run, a plain state_dict, or one whose keys carry another prefix (``model.``,
    ``module.``, ...: the prefix that matches most of this model's tensors is stripped).
    Every backbone tensor must be found with the right shape; only the classifier head may be
    skipped (another number of classes). Extra keys (e.g. compression buffers) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--model.checkpoint {path} does not exist. Produce it with a setup-B pretraining run "
            f"(configs/recipes/setupB_pretrain.yaml) or fetch the paper's checkpoints with scripts/download_ckpts.sh.")
    obj = _torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    own = net.state_dict()
    # the key prefix (none, "net.", "model.", "module.", ...: up to 3 dotted components) that names most of our tensors
    prefixes = {""} | {".".join(k.split(".")[:i]) + "." for k in state for i in range(1, min(4, k.count(".") + 1))}
    best = max(sorted(prefixes), key=lambda p: sum(k[len(p):] in own for k in state if k.startswith(p)))
    state = {k[len(best):]: v for k, v in state.items() if k.startswith(best)}
    head_keys = {k for k in own if k.startswith(head + ".")}
    load, skipped, bad = {}, [], []
    for k, v in own.items():
        if k in state and state[k].shape == v.shape:
            load[k] = state[k]
        elif k in head_keys:
            skipped.append(k)
        else:
            bad.append(f"{k} (expected {tuple(v.shape)}, found {tuple(state[k].shape) if k in state else 'nothing'})")
    if bad:
        unused = [k for k in state if k not in own]
        raise ValueError(f"checkpoint {path} does not fit this model: {len(bad)} tensors missing or mis-shaped, "
                         f"e.g. {bad[:3]}" + (f"; {len(unused)} checkpoint keys the model does not have, e.g. "
                                              f"{unused[:3]}" if unused else "")
                         + ". Is it a checkpoint of the same --model.backbone?")
    net.load_state_dict(load, strict=False)
    if skipped:
        rank_zero_info(f"checkpoint {path}: classifier head not loaded ({skipped}), it is trained from scratch")
    return skipped


# ----------------------------------------------------------------------------- 3. adapters
@dataclass
class Adapters:
    """What ``add_adapters`` added: the ``lora_A`` linears to patch (None: no adapters), the ``lora_B`` modules (they
    train as they are) and the asi_core method that compresses the ``lora_A`` inputs."""
    layers: Optional[list[str]] = None
    lora_b: list = field(default_factory=list)
    compress: str = "vanilla"


def add_adapters(net: nn.Module, hp, spec: ModelSpec, layer_type: str, include) -> Adapters:
    """``--model.method lora`` or ``--model.lora true``: peft LoRA adapters on the fine-tuned linears (or on
    ``--model.lora_targets``); the head trains too. Otherwise nothing."""
    if not (hp.method == LoRA.name or hp.lora):
        return Adapters(compress=hp.method)
    if hp.method not in (LoRA.name, *LoRA.composes):
        raise ValueError(f"--model.lora true composes LoRA with {', '.join(LoRA.composes[:-1])} or "
                         f"{LoRA.composes[-1]}, not {hp.method}")
    if hp.perplexity_file is not None:
        raise ValueError("--model.perplexity_file is not supported with LoRA: give --model.ranks")
    if layer_type != "linear" and hp.lora_targets is None:
        raise ValueError(f"LoRA adapts linear layers; {hp.backbone} fine-tunes {layer_type} layers "
                         f"(use --model.layer_type linear or --model.lora_targets, or another method)")
    from .llm import add_lora
    targets = (asi_core.candidate_layers(net, "linear", hp.lora_targets) if hp.lora_targets is not None else
               finetune_candidates(net, hp.num_finetune, layer_type, include))
    if not targets:
        names = asi_core.candidate_layers(net, "linear")
        near = difflib.get_close_matches(str(hp.lora_targets), names, n=5, cutoff=0.3)
        raise ValueError(f"--model.lora_targets {hp.lora_targets!r} matches none of {hp.backbone}'s linear layers "
                         f"(a regex searched in the name, or a glob); e.g. {near or names[-5:]}")
    layers, lora_b = add_lora(net, targets, hp.lora_rank, hp.lora_alpha)
    for p in net.get_submodule(spec.head).parameters():
        p.requires_grad_(True)
    return Adapters(layers, lora_b, LoRA.compress if hp.method == LoRA.name else hp.method)


# ----------------------------------------------------------------------------- 4. choose layers
@dataclass
class Choice:
    """The layers to patch (None: the last ``num_finetune`` of the layer type), the family's layer set they come
    from (segmentation's 5L/10L: layers, radii, freeze rules) and the method's options for ``asi_core.patch``,
    with the rank selection (metrics.json) when the ranks come from a perplexity table."""
    layers: Optional[list[str]]
    layer_set: Optional[dict]
    options: dict
    rank_selection: Optional[dict] = None


def choose_layers(net: nn.Module, hp, spec: ModelSpec, layer_type: str, include, adapters: Adapters) -> Choice:
    """--model.layers, the family's explicit layer set for --model.num_finetune (``spec.layer_sets``) or the last
    N layers; the method's options (per-layer radii of a layer set; asi ranks given or chosen under a budget)."""
    info = method_info(adapters.compress)
    options = {k: hp.get(k) for k in info.user_options}
    authors = family_layer_set(hp, spec)
    chosen = hp.layers if hp.layers is not None else (authors["layers"] if authors else None)
    if chosen is not None:
        if adapters.layers is not None:
            raise ValueError("--model.layers and the segmentation layer sets do not combine with LoRA")
        chosen = check_layer_names(net, list(chosen), layer_type)
    for option, values in (authors or {}).get("options", {}).items():  # Table 3's per-layer radii, in layer order
        if option in options:
            value_of = dict(zip(authors["layers"], values))
            options[option] = [value_of[n] for n in chosen]
    _check_rank_arguments(hp.method, hp.ranks, hp.perplexity_file, hp.budget)
    selection = None
    if hp.perplexity_file is not None:
        selection = select_ranks(net, hp.backbone, hp.num_finetune, hp.perplexity_file, hp.budget, hp.input_shape,
                                 layer_type, include, layers=chosen)
        options["ranks"] = [tuple(layer["ranks"]) for layer in selection["layers"]]
    elif "ranks" in options:
        options["ranks"] = ranks_option(hp.ranks)
    return Choice(chosen, authors, options, selection)


def family_layer_set(model_args: dict, spec: Optional[ModelSpec]) -> Optional[dict]:
    """The family's explicit layer set that ``--model.num_finetune`` selects (``spec.layer_sets``), unless
    ``--model.layers`` names the layers; None when there is none."""
    if spec is None or spec.layer_sets is None or model_args.get("layers") is not None:
        return None
    return spec.layer_sets(model_args.get("num_finetune"))


def naming_options(model_args: dict, spec: Optional[ModelSpec]) -> dict:
    """The model options as run names and reports show them: an option the family's layer set gives per layer
    reads "authors" (segmentation's gradient-filter radii: ``l5_Rauthors``, "Gradient filter (authors' radii)")."""
    out = dict(model_args)
    for option in (family_layer_set(model_args, spec) or {}).get("options", {}):
        out[option] = "authors"
    return out


def _check_rank_arguments(method: str, ranks, perplexity_file: Optional[str], budget) -> None:
    if perplexity_file is None and budget is None:
        return
    if not method_info(method).rank_selection:
        selectable = [m for m in MODEL_METHODS if method_info(m).rank_selection]
        raise ValueError(f"--model.perplexity_file and --model.budget choose the ranks of {', '.join(selectable)}; "
                         f"they do not apply to --model.method {method} (use --model.method "
                         f"{selectable[0]}, or drop them)")
    if perplexity_file is None:
        raise ValueError(f"--model.budget {budget} needs --model.perplexity_file: a perplexity.json from "
                         f"`python main.py measure` (docs/rank_selection.md)")
    if budget is None:
        raise ValueError("--model.perplexity_file needs --model.budget: MiB (e.g. 0.5), 'hosvd@0.8' (the paper's "
                         "protocol) or 'min'")
    if ranks is not None:
        raise ValueError(f"--model.ranks {ranks} and --model.perplexity_file both set the asi ranks; choose one "
                         f"(--model.ranks null to select them from the file under --model.budget)")


def finetune_candidates(net: nn.Module, num_finetune: Union[int, str], layer_type: str = "conv",
                        include=None, option: str = "num_finetune") -> list[str]:
    """The layers ``asi_core.patch(net, ..., num_finetune, layer_type=..., include=...)`` trains
    (``asi_core.choose_layers``), with an error naming the option and its valid range."""
    try:
        return asi_core.choose_layers(net, num_finetune, layer_type=layer_type, include=include)
    except ValueError:
        layers = asi_core.candidate_layers(net, layer_type, include)
        what = f"{layer_type} layers" + (f" matching include={include!r}" if include is not None else "")
        raise ValueError(f"{option} must be 'all' or an integer in [1, {len(layers)}] (the model's {what}), "
                         f"got {num_finetune!r}") from None


def select_ranks(net: nn.Module, backbone: str, num_finetune: Union[int, str], perplexity_file: str,
                 budget: Union[float, str], input_shape: Optional[List[int]] = None, layer_type: str = "conv",
                 include=None, layers: Optional[List[str]] = None) -> dict:
    """ASI ranks for the last ``num_finetune`` fine-tuned layers of ``net`` (``layer_type``, ``include``) from a
    perplexity table under ``budget``.

    The table must have been measured for ``backbone``, cover those layers and (when ``input_shape`` is
    given) the same input shape; otherwise ValueError names the mismatch. Returns ``asi_core.ranks.select``'s
    result (budget_mib, per layer name/eps/ranks/memory_mib/perplexity, totals) plus the request and the
    table's provenance: what metrics.json["rank_selection"] holds.
    """
    names = layers if layers is not None else finetune_candidates(net, num_finetune, layer_type, include)
    try:
        if str(perplexity_file).endswith(".pkl"):  # the authors' format, converted on load
            every = asi_core.candidate_layers(net, layer_type)  # their file: every such layer, in model order
            table = ranks_lib.table_from_authors_pickle(perplexity_file, every, backbone, input_shape)
        else:
            table = ranks_lib.load_table(perplexity_file)
        ranks_lib.check_table_matches(table, model_name=backbone, layer_names=names, input_shape=input_shape)
        ranks_lib.check_table_consistent(table, str(perplexity_file))
        chosen = ranks_lib.select(table, budget, layers=names)
    except ValueError as err:
        raise ValueError(f"--model.perplexity_file {perplexity_file}: {err}") from None
    rank_zero_info(f"asi ranks from {perplexity_file} under budget {budget} ({chosen['budget_mib']:.4g} MiB): "
                   f"{chosen['total_memory_mib']:.4g} MiB, perplexity {chosen['total_perplexity']:.4g}; "
                   + ", ".join(f"{c['name']} eps={c['eps']} r={tuple(c['ranks'])}" for c in chosen["layers"]))
    return {"perplexity_file": str(perplexity_file), "budget": budget, **chosen,
            "table": {k: table[k] for k in ("model", "dataset", "input_shape", "batch_size", "epsilons",
                                           "num_batches")}}


def check_layer_names(net: nn.Module, names: List[str], layer_type: str = "conv") -> List[str]:
    """``names`` (--model.layers) in the network's registration order; a name that is not one of its ``layer_type``
    layers -> ValueError with the nearest names (difflib)."""
    candidates = asi_core.candidate_layers(net, layer_type)
    if not names:
        raise ValueError("--model.layers is empty: name at least one layer, or leave it unset")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--model.layers names {repeated} more than once: name each layer once (the run would "
                         f"train {len(set(names))} layers, not {len(names)})")
    for name in names:
        if name not in candidates:
            near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
            raise ValueError(f"--model.layers: {name!r} is not a {layer_type} layer of this model; nearest names: "
                             f"{near or candidates[-5:]}")
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(set(names), key=order.__getitem__)


def ranks_option(ranks):
    """--model.ranks as asi_core.patch takes it: an int, one tuple for every layer, or one tuple per layer."""
    if ranks is None:
        return ASI_DEFAULT_RANKS
    if isinstance(ranks, int):
        return ranks
    if all(isinstance(r, int) for r in ranks):
        return tuple(ranks)
    return [tuple(r) for r in ranks]


# ----------------------------------------------------------------------------- 5. patch
def patch_layers(net: nn.Module, hp, layer_type: str, include, adapters: Adapters, choice: Choice) -> list[str]:
    """``asi_core.patch``: the ``lora_A`` linears with the adapters' compression, else the chosen layers (or the
    last ``num_finetune``) with the method; returns the patched names."""
    if adapters.layers is not None:  # the lora_A linears (their input is the activation LoRA keeps)
        return asi_core.patch(net, adapters.compress, layers=adapters.layers, lean=hp.lean, layer_type="linear",
                              **choice.options)
    return asi_core.patch(net, hp.method, num_finetune=None if choice.layers else hp.num_finetune,
                          layers=choice.layers, lean=hp.lean, layer_type=layer_type, include=include,
                          **choice.options)


# ----------------------------------------------------------------------------- 6. freeze
def freeze(net: nn.Module, hp, adapters: Adapters, choice: Choice) -> set[str]:
    """What trains beyond ``asi_core.patch``'s rule (everything registered before the first patched layer is
    frozen): a network that says which of its parameters train (``net.freeze_unpatched``: the LLMs train only the
    patched linears, LoRA's lora_B and the head; ``num_finetune`` "all" without LoRA trains everything), then the
    layer set's freeze rules. Returns the parameters those rules leave trainable (the norm policy reads them)."""
    if hasattr(net, "freeze_unpatched"):
        if hp.num_finetune == "all" and adapters.layers is None:  # pretraining, setup B half 1
            for p in net.parameters():
                p.requires_grad_(True)
        else:
            net.freeze_unpatched(adapters.lora_b)
    if choice.layer_set is None:
        return set()
    apply_freeze_rules(net, choice.layer_set["freeze"])  # the authors' freeze_layers: some layers train uncompressed
    return {n for n, p in net.named_parameters() if p.requires_grad}


def apply_freeze_rules(model: nn.Module, rules: Iterable[str]) -> None:
    """The authors' ``freeze_layers``: every parameter starts trainable (their model as built), then in order
    ``path`` freezes every parameter under it and ``~path`` unfreezes. Replaces whatever was frozen before (e.g.
    ``asi_core.patch``'s "everything registered before the first patched layer")."""
    for p in model.parameters():
        p.requires_grad_(True)
    for rule in rules:
        active = rule.startswith("~")
        path = rule[1:] if active else rule
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"freeze rule {rule!r}: no module {path!r} in the model") from None
        for p in target.parameters():
            p.requires_grad_(active)


# ----------------------------------------------------------------------------- 7. recompute
def enable_recompute(net: nn.Module, patched: list[str], hp) -> list[str]:
    """``--model.checkpointing`` / ``--model.recompute`` (asi_core.recompute); returns the recomputed segments."""
    if not (hp.checkpointing or hp.recompute):
        return []
    from asi_core import recompute as recompute_lib
    return recompute_lib.enable(net, patched, "checkpointing" if hp.checkpointing else "recompute")


# ----------------------------------------------------------------------------- 8. norm policy
def apply_norm_policy(net: nn.Module, hp, patched: list[str], choice: Choice, rule_trainable: set[str]) -> list[str]:
    """BatchNorm: ``set_bn_eval`` freezes every BN's affine parameters (their running statistics are kept in eval
    mode by the module's ``train``); ``train_bn_affine`` then trains the scale and shift of the BNs after the first
    fine-tuned layer (the authors' rule) or, with a layer set, those its freeze rules leave trainable. Returns the
    BN modules whose affine parameters train."""
    if hp.set_bn_eval:
        _set_trainable(net, [n for n, m in net.named_modules() if isinstance(m, _BN)], False)
    if not hp.train_bn_affine:
        return []
    if choice.layer_set is not None:
        names = [n for n, m in net.named_modules() if isinstance(m, _BN)
                 and any(f"{n}.{k}" in rule_trainable for k in ("weight", "bias"))]
    else:
        names = bn_after_first(net, patched[0])
    _set_trainable(net, names, True)
    return names


def _set_trainable(net: nn.Module, names: Iterable[str], flag: bool) -> None:
    for name in names:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(flag)


def bn_after_first(net: nn.Module, first: str) -> list[str]:
    """BatchNorm modules registered after the layer ``first`` (the authors' freeze_layers rule: every leaf
    module registered after the first fine-tuned conv keeps its parameters trainable)."""
    names, seen = [], False
    for name, m in net.named_modules():
        if name == first:
            seen = True
        elif seen and isinstance(m, _BN) and any(True for _ in m.parameters()):
            names.append(name)
    return names


# ----------------------------------------------------------------------------- 9. micro-batched frozen prefix
def micro_batch_prefix(net: nn.Module, hp) -> list[tuple[str, list[str]]]:
    """``--model.frozen_micro_batch N``: the frozen prefix (everything before the first trainable parameter) runs N
    samples at a time (asi_core.microbatch: the same output, a lower peak where the frozen forward sets it). After
    the norm policy, which decides the last trainable parameters. Returns what runs in micro-batches."""
    if hp.get("frozen_micro_batch") is None:
        return []
    from asi_core import microbatch
    converted = microbatch.enable(net, hp.frozen_micro_batch)
    if not converted:
        rank_zero_warn(f"--model.frozen_micro_batch {hp.frozen_micro_batch}: {hp.backbone} has no frozen prefix "
                       f"that can run in micro-batches (every layer trains, or its forward cannot be traced by "
                       f"torch.fx); the whole batch runs at once")
    return converted


# ----------------------------------------------------------------------------- 10. approximate region
def approximate_region(net: nn.Module, hp) -> dict[str, Any]:
    """``--model.approx_activations`` and ``--model.saved_bits`` (asi_core.approx, opt-in approximations of what
    exact ASI cannot drop): GELU/SiLU modules keep a 2-bit derivative code, and what autograd saves during the
    network's forward is kept in ``saved_bits`` bits per element. Returns what was done (profile reports it)."""
    out: dict[str, Any] = {}
    if hp.get("approx_activations"):
        from asi_core import approx
        out["approximated_activations"] = approx.approximate_activations(net)
        if not out["approximated_activations"]:
            rank_zero_warn(f"--model.approx_activations true: {hp.backbone} has no GELU or SiLU module (registered "
                           f"classes: asi_core.approx.register_activation); every activation stays exact")
    if hp.get("saved_bits") is not None:
        from asi_core import approx
        approx.compress_saved(net, hp.saved_bits)
        out["saved_bits"] = hp.saved_bits
    return out


# ----------------------------------------------------------------------------- 11. optimiser recipe
def make_optimizer(params: list, hp) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params``: SGD (lr, momentum, weight decay) or Adam (lr, betas, weight decay)."""
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.adam_betas))


def configure_optimizers(params: list, hp, trainer=None):
    """The recipe's optimiser over ``params`` with the learning-rate schedule of ``hp`` (warm-up, cosine or constant,
    per step or per epoch), as Lightning's ``configure_optimizers`` returns it."""
    opt = make_optimizer(params, hp)
    if hp.scheduler == "constant" and hp.warmup_epochs == 0:
        return opt
    max_epochs = trainer.max_epochs if trainer is not None else None
    if hp.scheduler_interval == "epoch":
        if max_epochs is None or max_epochs <= 0:
            raise ValueError("--model.scheduler_interval epoch needs --trainer.max_epochs (the schedule's length)")
        total, warmup = max_epochs, hp.warmup_epochs
    else:
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if not math.isfinite(total):
            raise ValueError("the learning-rate schedule needs a finite run: set --trainer.max_epochs or max_steps")
        epochs = max_epochs if max_epochs and max_epochs > 0 else 1
        warmup = int(round(total * hp.warmup_epochs / epochs))
    factor = partial(lr_factor, total=total, warmup=warmup, cosine=hp.scheduler == "cosine",
                     min_factor=hp.lr_min_factor, warmup_start=hp.warmup_start_factor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.scheduler_interval}}


def lr_factor(t: int, total: int, warmup: int, cosine: bool = True, min_factor: float = 0.0,
              warmup_start: Optional[float] = None) -> float:
    """Learning rate / peak lr at scheduler step ``t`` (a batch or an epoch) of ``total``.

    Warm-up (t < warmup): ``(t + 1) / warmup`` (ours), or with ``warmup_start`` s the authors' line
    s + (1 - s) t / (warmup - 1), which reaches 1 at the last warm-up step. Then cosine annealing from 1 to
    ``min_factor`` over the remaining total - warmup steps (the authors: CosineAnnealingLR's
    eta_min + (lr - eta_min)(1 + cos(pi t / T)) / 2 without warm-up, eta_min = 0.1 lr; after a warm-up their
    LambdaLR anneals to 0), or 1 (constant)."""
    if t < warmup:
        if warmup_start is None:
            return (t + 1) / warmup
        return warmup_start + (1.0 - warmup_start) * t / max(1, warmup - 1)
    if not cosine:
        return 1.0
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
