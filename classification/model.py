"""LightningModule: a model-zoo network (backbone + pooling + linear head) whose last
``num_finetune`` convolutions (or linear layers, ``layer_type``/``include``) are trained with one of
``asi_core.METHODS``.

Construction order: build -> ImageNet weights (setup A) or ``checkpoint`` (setup B) ->
new head -> ``asi_core.patch`` on the last N convs -> BatchNorm frozen (``set_bn_eval``).
The optimiser recipes are those of the paper (App. B.1): SGD (lr 0.05, momentum 0 on downstream
sets; lr 0.005, momentum 0.9, 4 warm-up epochs on ImageNet setup B), weight decay 1e-4, cosine
annealing; L2 gradient clipping 2.0 is the Trainer's ``gradient_clip_val``.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import asi_core
import asi_core.ranks as ranks_lib

from .backbones import create_model, get_spec

# Which constructor arguments each method takes (forwarded to asi_core.patch as options).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "gradfilter": ("radius",),
    "gradfilter_paper": ("radius",),
    "hosvd": ("eps",),
    "asi": ("ranks", "warm_start"),
}
# --model.method choices: asi_core's activation-compression methods, plus LoRA (peft adapters on the fine-tuned
# linears, trained as they are: vanilla compression on their lora_A layers; see ClassificationModel)
MODEL_METHODS: tuple[str, ...] = (*asi_core.METHODS, "lora")

_BN = nn.modules.batchnorm._BatchNorm


class RandomBackboneWarning(UserWarning):
    """Fine-tuning a few layers on top of a random, frozen backbone (profile/benchmark do it on purpose and
    silence this category)."""
ASI_DEFAULT_RANKS = 4  # --model.ranks when neither ranks nor a perplexity file is given


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


def _check_rank_arguments(method: str, ranks, perplexity_file: Optional[str], budget) -> None:
    if perplexity_file is None and budget is None:
        return
    if method != "asi":
        raise ValueError(f"--model.perplexity_file and --model.budget choose the ranks of asi; they do not apply to "
                         f"--model.method {method} (use --model.method asi, or drop them)")
    if perplexity_file is None:
        raise ValueError(f"--model.budget {budget} needs --model.perplexity_file: a perplexity.json from "
                         f"`python main.py measure` (README, 'Rank selection')")
    if budget is None:
        raise ValueError("--model.perplexity_file needs --model.budget: MiB (e.g. 0.5), 'hosvd@0.8' (the paper's "
                         "protocol) or 'min'")
    if ranks is not None:
        raise ValueError(f"--model.ranks {ranks} and --model.perplexity_file both set the asi ranks; choose one "
                         f"(--model.ranks null to select them from the file under --model.budget)")


def finetune_candidates(net: nn.Module, num_finetune: Union[int, str], layer_type: str = "conv",
                        include=None, option: str = "num_finetune") -> list[str]:
    """The layers ``asi_core.patch(net, ..., num_finetune, layer_type=..., include=...)`` trains, checked."""
    layers = asi_core.candidate_layers(net, layer_type, include)
    what = f"{layer_type} layers" + (f" matching include={include!r}" if include is not None else "")
    if num_finetune == "all" and layers:
        return layers
    if isinstance(num_finetune, int) and not isinstance(num_finetune, bool) and 1 <= num_finetune <= len(layers):
        return layers[-num_finetune:]
    raise ValueError(f"{option} must be 'all' or an integer in [1, {len(layers)}] (the model's {what}), "
                     f"got {num_finetune!r}")


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
    import difflib

    candidates = asi_core.candidate_layers(net, layer_type)
    if not names:
        raise ValueError("--model.layers is empty: name at least one layer, or leave it unset")
    for name in names:
        if name not in candidates:
            near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
            raise ValueError(f"--model.layers: {name!r} is not a {layer_type} layer of this model; nearest names: "
                             f"{near or candidates[-5:]}")
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(set(names), key=order.__getitem__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model_options(method: str = "vanilla", num_finetune="all", ranks=None, eps: float = 0.8, radius: int = 2,
                        lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 1e-4, warmup_epochs: int = 0,
                        warm_start: bool = True, **_) -> list[str]:
    """Check the numbers of the model options before anything is built: ValueError naming the option, the value and
    the valid range. Returns warnings for options set away from their default that ``method`` ignores."""
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
    used = METHOD_OPTIONS.get(method, ())
    if "eps" in used and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps <= 1)):
        bad("eps", eps, "hosvd's explained-variance threshold must be in (0, 1]")
    if "radius" in used and (not _is_int(radius) or radius < 1):
        bad("radius", radius, "gradfilter's patch radius must be an integer >= 1")
    if "ranks" in used and ranks is not None:
        if _is_int(ranks):
            flat = [ranks]
        elif isinstance(ranks, (list, tuple)) and ranks and all(_is_int(r) for r in ranks):
            flat = list(ranks)
        elif isinstance(ranks, (list, tuple)) and ranks and all(isinstance(t, (list, tuple)) and t for t in ranks):
            flat = [r for t in ranks for r in t]
        else:
            flat = None
        if flat is None or not all(_is_int(r) and r >= 1 for r in flat):
            bad("ranks", ranks, "asi ranks must be one integer >= 1, one list of per-mode ranks for every layer, or "
                                "one such list per fine-tuned layer, of integers >= 1")
    warnings_ = []
    defaults = {"eps": 0.8, "radius": 2, "ranks": None, "warm_start": True}
    given = {"eps": eps, "radius": radius, "ranks": ranks, "warm_start": warm_start}
    for option, value in given.items():
        if option not in used and value != defaults[option]:
            owners = [m for m, opts in METHOD_OPTIONS.items() if option in opts]
            warnings_.append(f"--model.{option} {value!r} is ignored by --model.method {method} (it applies to "
                             f"{', '.join(owners)})")
    return warnings_


def ranks_option(ranks):
    """--model.ranks as asi_core.patch takes it: an int, one tuple for every layer, or one tuple per layer."""
    if ranks is None:
        return ASI_DEFAULT_RANKS
    if isinstance(ranks, int):
        return ranks
    if all(isinstance(r, int) for r in ranks):
        return tuple(ranks)
    return [tuple(r) for r in ranks]


class ClassificationModel(pl.LightningModule):
    def __init__(
        self,
        backbone: str = "mcunet",
        num_classes: int = 10,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        method: str = "vanilla",
        num_finetune: Union[int, Literal["all"]] = 2,
        layer_type: Optional[Literal["conv", "linear"]] = None,
        include: Optional[Union[str, List[str]]] = None,
        layers: Optional[List[str]] = None,
        ranks: Optional[Union[int, List[int], List[List[int]]]] = None,
        perplexity_file: Optional[str] = None,
        budget: Optional[Union[float, str]] = None,
        eps: float = 0.8,
        radius: int = 2,
        warm_start: bool = True,
        lean: Optional[bool] = None,
        checkpointing: bool = False,
        recompute: bool = False,
        set_bn_eval: bool = True,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        lr_min_factor: float = 0.0,
        warmup_start_factor: Optional[float] = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        train_bn_affine: bool = False,
        input_shape: Optional[List[int]] = None,
        name_or_path: Optional[str] = None,
        lora: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Optional[Union[str, List[str]]] = None,
        shape_only: Optional[bool] = None,
        num_blocks: Optional[int] = None,
    ):
        """Classifier fine-tuned with activation compression.

        Args:
            backbone: Model-zoo name: mcunet (MCUNet-in1), mobilenet_v2, resnet18, resnet34, swin_t or vit_b_32
                (swin_tiny_test and vit_tiny_test: random-weight miniatures for tests); LLMs (classification/llm.py):
                tinyllama (TinyLlama-1.1B-Chat-v1.0), llama_tiny (a tiny random-init LLaMA) or hf (any LLaMA-family
                model given by --model.name_or_path); segmentation (paper Table 3, segmentation/models.py):
                pspnet_r18, deeplabv3_r18, fcn_r18, upernet_r18, pspnet_mv2, deeplabv3_mv2 (start them from
                --model.checkpoint or with --model.pretrained false).
            num_classes: Classes of the head; linked from --data.name, not set by hand.
            pretrained: Start from the published ImageNet weights (setup A). If they can be neither found
                under ckpts/imagenet/ nor downloaded, the run stops and names the file to provide.
            checkpoint: Start from this checkpoint instead (setup B: the pretraining run's file under ckpts/).
                Its head is reused when the class count matches.
            method: Activation compression: vanilla, gradfilter, hosvd or asi (asi_core.METHODS); or lora: peft LoRA
                adapters on the fine-tuned linears, only they (and the head) train.
            num_finetune: Number of last layers (of --model.layer_type, matching --model.include) to train, or
                "all". Everything registered before the first of them is frozen. LLM backbones: only those
                linears and the head train (the last block's norms come after its MLP in registration order), and
                "all" trains the whole network (pretraining).
            layer_type: What num_finetune counts: "conv" (nn.Conv2d) or "linear" (nn.Linear). Default: the
                backbone's (conv for the CNNs, linear for the transformers).
            layers: Train exactly these layers (qualified names of --model.layer_type layers) instead of the last
                --model.num_finetune; everything registered before the first of them is frozen. For the segmentation
                networks, --model.num_finetune 5 or 10 selects the authors' explicit lists (segmentation/layer_sets.py)
                with their freeze rules and, for the gradient filters, their per-layer radii.
            include: Only layers whose qualified name matches: a regex searched in the name ("mlp") or a glob
                ("*.mlp.*"), or a list of them. Default: the backbone's ("mlp" for the transformers, as the paper
                counts their #Layers; none for the CNNs).
            ranks: asi: one rank for every mode of every layer, one list of per-mode ranks for every layer
                ([r1, r2, r3, r4] for a conv, one per input mode for a linear layer), or one such list per
                fine-tuned layer, in layer order. Default: 4, or chosen per layer from --model.perplexity_file
                (give one or the other).
            perplexity_file: asi: a perplexity.json of ``python main.py measure`` (same backbone, batch size and
                resolution, covering the fine-tuned layers), or the authors' perplexity.pkl (converted on load); ranks are then chosen per layer under --model.budget
                (asi_core.ranks.select, eq. 9) and written to metrics.json["rank_selection"].
            budget: asi with --model.perplexity_file: activation-memory budget of the fine-tuned layers, in MiB
                (e.g. 0.5); "hosvd@0.8" = the memory HOSVD with eps 0.8 needs on the same layers, read from the
                same file (the paper's protocol); or "min" (the least memory the table offers).
            eps: hosvd: explained-variance threshold in (0, 1] (paper: 0.8).
            radius: gradfilter: patch radius R >= 1 of gradient filtering.
            warm_start: asi: start each step's subspace iteration from the previous step's factors.
            lean: Memory-lean backward for frozen BN and ReLU in the fine-tuned region; None = asi_core's default.
            checkpointing: Activation checkpointing of the fine-tuned region (the baseline users pick instead of
                compression; any method, CNNs too): each block of the region keeps only its input and is recomputed
                in backward (asi_core.recompute, mode "checkpointing"). Exact gradients, one more forward per block.
            recompute: Recompute in backward the parts of the fine-tuned region that hold no patched layer (a
                transformer block's attention, ...) instead of storing their activations, while the patched layers
                keep their compressed activations from the forward (asi_core.recompute, mode "recompute"). Exact.
                Not together with checkpointing.
            set_bn_eval: Keep every BatchNorm in eval mode and its affine parameters frozen (paper behaviour).
            optimizer: "sgd" (paper) or "adam".
            lr: Peak learning rate (paper: 0.05 downstream sets, 0.005 ImageNet setup B).
            momentum: SGD momentum (paper: 0 downstream, 0.9 ImageNet setup B).
            weight_decay: L2 weight decay (paper: 1e-4).
            warmup_epochs: Epochs of linear learning-rate warm-up (paper: 4 on ImageNet setup B).
            scheduler: "cosine" annealing over the run (to lr_min_factor x lr), or "constant".
            lr_min_factor: Where the cosine ends, as a fraction of lr: 0 (ours) or 0.1 (the authors' code without
                warm-up, CosineAnnealingLR eta_min = 0.1 lr; their warm-up branch anneals to 0).
            warmup_start_factor: Linear warm-up from this fraction of lr, reaching lr at the last warm-up epoch
                (the authors' code: 0.25). None (ours): (step + 1) / warmup_steps.
            scheduler_interval: Update the learning rate every "step" (ours) or every "epoch" (the authors' code).
            adam_betas: Adam's betas: (0.9, 0.999) (PyTorch's default), (0.8, 0.9) in the authors' code.
            train_bn_affine: Train the scale and shift of every BatchNorm registered after the first fine-tuned conv
                (the authors' code), in eval mode with frozen running statistics when set_bn_eval. False (ours):
                every BatchNorm parameter is frozen.
            input_shape: Network input [batch size, 3, resolution, resolution]; linked from --data.batch_size and
                --data.resolution, not set by hand. Checked against --model.perplexity_file (None: not checked).
            name_or_path: LLM backbones: a local model directory or a hub name to load (weights, config); default for
                tinyllama: ckpts/hf/TinyLlama-1.1B-Chat-v1.0/ when it exists, else the hub.
            lora: With vanilla/hosvd/asi: add LoRA adapters on the fine-tuned linears and compress the input of their
                lora_A layers with the method (ASI composed with LoRA). --model.method lora is the same with vanilla.
            lora_rank: LoRA rank r.
            lora_alpha: LoRA scaling alpha (the update is alpha / r * B A x).
            lora_targets: LoRA on these linears (a regex or glob, or a list; matched like --model.include) instead of
                the last --model.num_finetune ones.
            shape_only: LLM backbones: build the network with fake tensors (FakeTensorMode: no memory, no arithmetic,
                real shapes); `profile` sets it for LLMs. None = false outside profile.
            num_blocks: LLM backbones: keep only the last N decoder blocks (benchmarks of a real-width model on a CPU).
        """
        super().__init__()
        self.save_hyperparameters()
        if method not in MODEL_METHODS:
            raise ValueError(f"Unknown method {method!r}; valid choices: {', '.join(MODEL_METHODS)}")
        for msg in check_model_options(method, num_finetune, ranks, eps, radius, lr, momentum, weight_decay,
                                       warmup_epochs, warm_start):
            rank_zero_warn(msg)
        self.nonfinite_steps = 0  # training steps whose loss was NaN/inf (metrics.json, "diverged")
        spec = get_spec(backbone)
        if checkpointing and recompute:
            raise ValueError("--model.checkpointing and --model.recompute both recompute the fine-tuned region; "
                             "choose one (checkpointing: whole blocks, patched layers included; recompute: only "
                             "the parts without a patched layer)")
        if spec.fixed_resolution is not None and input_shape is not None and \
                tuple(input_shape[-2:]) != (spec.fixed_resolution,) * 2:
            raise ValueError(f"{backbone} takes {spec.fixed_resolution}x{spec.fixed_resolution} inputs only (its "
                             f"position embeddings), got --data.resolution {input_shape[-1]}; pass "
                             f"--data.resolution {spec.fixed_resolution}")
        self.paper_flops_per_mac = spec.paper_flops_per_mac  # scales paper_gflops (resources, metrics.json)
        self.layer_type = layer_type or spec.layer_type
        self.include = include if include is not None else spec.include
        self.task = spec.task
        family = {}
        if shape_only and method == "hosvd":
            raise ValueError("shape-only execution (--model.shape_only, profile's default for LLMs) cannot make a "
                             "data-dependent choice, and hosvd's ranks come from the data: pass --model.shape_only "
                             "false (a real step with random weights) or profile asi with --model.ranks")
        if spec.create is not None and spec.task != "segmentation":  # LLMs build and load themselves
            family = dict(name_or_path=name_or_path, shape_only=bool(shape_only), num_blocks=num_blocks)
        elif name_or_path is not None or shape_only or num_blocks is not None:
            raise ValueError(f"--model.name_or_path, shape_only and num_blocks are for the LLM backbones, not {backbone}")
        self.net = create_model(backbone, num_classes, pretrained=pretrained and checkpoint is None, **family)
        has_bn = any(isinstance(m, _BN) for m in self.net.modules())
        if not pretrained and checkpoint is None and (num_finetune != "all" or (set_bn_eval and has_bn)):
            why = []
            if num_finetune != "all":
                why.append(f"only the last {num_finetune} layer(s) and the head learn, on top of a randomly "
                           f"initialised and frozen backbone")
            if set_bn_eval and has_bn:
                why.append("BatchNorm stays in eval mode with its initial statistics, so the features shrink layer "
                           "by layer (to ~1e-10) and are nearly the same for every input")
            rank_zero_warn(
                "--model.pretrained false and no --model.checkpoint: " + "; ".join(why) + ". Expect chance accuracy. "
                "Train from scratch with --model.num_finetune all --model.set_bn_eval false, or fine-tune from "
                "pretrained weights (--model.pretrained true, or a setup-B --model.checkpoint)",
                category=RandomBackboneWarning)
        if checkpoint is not None:
            load_checkpoint_weights(self.net, checkpoint, spec.head)
        compress, lora_layers, lora_b = method, None, []
        if method == "lora" or lora:
            if method not in ("lora", "vanilla", "hosvd", "asi"):
                raise ValueError(f"--model.lora true composes LoRA with vanilla, hosvd or asi, not {method}")
            if perplexity_file is not None:
                raise ValueError("--model.perplexity_file is not supported with LoRA: give --model.ranks")
            if self.layer_type != "linear" and lora_targets is None:
                raise ValueError(f"LoRA adapts linear layers; {backbone} fine-tunes {self.layer_type} layers "
                                 f"(use --model.layer_type linear or --model.lora_targets, or another method)")
            from .llm import add_lora
            targets = (asi_core.candidate_layers(self.net, "linear", lora_targets) if lora_targets is not None else
                       finetune_candidates(self.net, num_finetune, self.layer_type, self.include))
            lora_layers, lora_b = add_lora(self.net, targets, lora_rank, lora_alpha)
            compress = "vanilla" if method == "lora" else method
            for p in self.net.get_submodule(spec.head).parameters():
                p.requires_grad_(True)
        options = {k: getattr(self.hparams, k) for k in METHOD_OPTIONS.get(compress, ())}
        # the paper's explicit layer sets (segmentation "5L"/"10L"), or --model.layers
        from segmentation.layer_sets import apply_freeze_rules, layer_set

        authors = layer_set(backbone, num_finetune) if layers is None else None
        chosen = layers if layers is not None else (authors["layers"] if authors else None)
        if chosen is not None:
            if lora_layers is not None:
                raise ValueError("--model.layers and the segmentation layer sets do not combine with LoRA")
            chosen = check_layer_names(self.net, list(chosen), self.layer_type)
        if authors is not None and "radius" in options:  # Table 3's per-layer radii, in patch's layer order
            radius_of = dict(zip(authors["layers"], authors["radii"]))
            options["radius"] = [radius_of[n] for n in chosen]
        self.rank_selection: Optional[dict] = None  # set when ranks come from a perplexity file
        _check_rank_arguments(method, ranks, perplexity_file, budget)
        if perplexity_file is not None:
            self.rank_selection = select_ranks(self.net, backbone, num_finetune, perplexity_file, budget, input_shape,
                                               self.layer_type, self.include, layers=chosen)
            options["ranks"] = [tuple(layer["ranks"]) for layer in self.rank_selection["layers"]]
        elif "ranks" in options:
            options["ranks"] = ranks_option(ranks)
        if lora_layers is not None:  # the lora_A linears (their input is the activation LoRA keeps)
            self.patched = asi_core.patch(self.net, compress, layers=lora_layers, lean=lean, layer_type="linear",
                                          **options)
        else:
            self.patched = asi_core.patch(self.net, method, num_finetune=None if chosen else num_finetune,
                                          layers=chosen, lean=lean, layer_type=self.layer_type, include=self.include,
                                          **options)
        if hasattr(self.net, "freeze_unpatched"):  # LLMs: only the patched linears (+ lora_B) and the head train,
            if num_finetune == "all" and lora_layers is None:  # or everything ("all": pretraining, setup B half 1)
                for p in self.net.parameters():
                    p.requires_grad_(True)
            else:
                self.net.freeze_unpatched(lora_b)
        rule_trainable: set[str] = set()
        if authors is not None:  # the authors' freeze_layers: some layers train uncompressed (e.g. conv_seg)
            apply_freeze_rules(self.net, authors["freeze"])
            rule_trainable = {n for n, p in self.net.named_parameters() if p.requires_grad}
        self.recomputed: list[str] = []
        if checkpointing or recompute:
            from asi_core import recompute as recompute_lib
            self.recomputed = recompute_lib.enable(self.net, self.patched,
                                                   "checkpointing" if checkpointing else "recompute")
        if set_bn_eval:
            for m in self.net.modules():
                if isinstance(m, _BN):
                    for p in m.parameters():
                        p.requires_grad_(False)
        if train_bn_affine and authors is not None:  # segmentation: BN affine trains where the freeze rules leave it
            self.bn_affine_trained = [n for n, m in self.net.named_modules() if isinstance(m, _BN)
                                      and any(f"{n}.{k}" in rule_trainable for k in ("weight", "bias"))]
            for name in self.bn_affine_trained:
                for p in self.net.get_submodule(name).parameters():
                    p.requires_grad_(True)
        elif train_bn_affine:
            self.bn_affine_trained = bn_after_first(self.net, self.patched[0])
            for name in self.bn_affine_trained:
                for p in self.net.get_submodule(name).parameters():
                    p.requires_grad_(True)
        else:
            self.bn_affine_trained = []
        self.train(self.training)
        self.monitor = "val/acc"  # what ModelCheckpoint keeps the best of
        if self.task == "segmentation":  # pixel labels: mmseg's loss and mIoU/mAcc (segmentation/)
            from segmentation.loss import PixelCrossEntropy
            from segmentation.metrics import SegmentationScores

            self.criterion = PixelCrossEntropy(num_classes=num_classes)
            self.train_acc = None
            self.val_acc, self.test_acc = SegmentationScores(num_classes), SegmentationScores(num_classes)
            self.monitor = "val/miou"
            return
        # top-1 accuracy over samples, as the paper reports (torchmetrics' default would be macro)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.criterion = nn.CrossEntropyLoss()

    def random_targets(self, batch_size: int, resolution: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random labels for a (batch_size, 3, resolution, resolution) input (profile, benchmark)."""
        shape = (batch_size, resolution, resolution) if self.task == "segmentation" else (batch_size,)
        return torch.randint(0, self.hparams.num_classes, shape, generator=generator)
    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        """``set_bn_eval``: BatchNorm stays in eval mode whenever the module is switched to training."""
        super().train(mode)
        if mode and self.hparams.set_bn_eval:
            for m in self.net.modules():
                if isinstance(m, _BN):
                    m.eval()
        return self

    # Lightning 2.x does not call .train() at the start of fit (it keeps the mode it is given and
    # restores it after validation), so the BN modes are also (re)applied where training starts.
    def on_train_start(self):
        self.train(self.training)
        what = f"{self.layer_type} layers" + (f" matching include={self.include!r}" if self.include is not None else "")
        rank_zero_info(f"{self.hparams.backbone}: {self.hparams.method} on the last {len(self.patched)} {what}: "
                       f"{', '.join(self.patched)}"
                       + (f"; {'checkpointing' if self.hparams.checkpointing else 'recompute'} of "
                          f"{', '.join(self.recomputed) or 'nothing'}" if self.recomputed or self.hparams.checkpointing
                          or self.hparams.recompute else ""))

    def on_train_epoch_start(self):
        self.train(self.training)

    def forward(self, x):
        return self.net(x)

    # ------------------------------------------------------------------ steps
    def _step(self, batch, stage: str, metric):
        if self.task == "segmentation":
            return self._segmentation_step(batch, stage, metric)
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _segmentation_step(self, batch, stage: str, scores):
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)  # resizes the logits to the label map when they differ (VOC val)
        if scores is not None:
            if logits.shape[-2:] != y.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            scores.update(logits.argmax(1), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(y))
        return loss

    def _log_segmentation_scores(self, stage: str, scores) -> None:
        if self.task != "segmentation" or scores.update_count == 0:
            return
        for k, v in scores.scores().items():  # mIoU, mAcc, aAcc in percent, over the whole evaluation set
            self.log(f"{stage}/{k}", v, prog_bar=k == "miou", sync_dist=False)
        scores.reset()

    def on_validation_epoch_end(self):
        self._log_segmentation_scores("val", self.val_acc)

    def on_test_epoch_end(self):
        self._log_segmentation_scores("test", self.test_acc)

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", self.train_acc)
        if not torch.isfinite(loss):
            self.nonfinite_steps += 1
        return loss

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with a message that says what to do when compression buffers do not match: a
        checkpoint of a model patched with another method (or an unpatched one)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            own = set(self.state_dict())
            extra = sorted(k for k in state_dict if k not in own)
            missing = sorted(k for k in own if k not in state_dict)
            if not any(".method." in k for k in extra + missing):
                raise
            raise RuntimeError(
                f"the checkpoint's compression buffers do not match this model (--model.method "
                f"{self.hparams.method}, --model.num_finetune {self.hparams.num_finetune}): unexpected keys "
                f"{extra[:4]}{' ...' if len(extra) > 4 else ''}, missing keys {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}. Load it into a model built with the checkpoint's own method "
                f"and num_finetune (its run's config.yaml), or start from its weights only with "
                f"--model.checkpoint, which ignores compression buffers") from err

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    # ------------------------------------------------------------------ recipe
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.adam_betas))
        if hp.scheduler == "constant" and hp.warmup_epochs == 0:
            return opt
        max_epochs = self.trainer.max_epochs if self.trainer is not None else None
        if hp.scheduler_interval == "epoch":
            if max_epochs is None or max_epochs <= 0:
                raise ValueError("--model.scheduler_interval epoch needs --trainer.max_epochs (the schedule's length)")
            total, warmup = max_epochs, hp.warmup_epochs
        else:
            total = self.trainer.estimated_stepping_batches if self.trainer is not None else math.inf
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
