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

import math
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import asi_core
import asi_core.ranks as ranks_lib

from .backbones import create_model, get_spec

# Which constructor arguments each method takes (forwarded to asi_core.patch as options).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "gradfilter": ("radius",),
    "hosvd": ("eps",),
    "asi": ("ranks", "warm_start"),
}

_BN = nn.modules.batchnorm._BatchNorm
ASI_DEFAULT_RANKS = 4  # --model.ranks when neither ranks nor a perplexity file is given


def _torch_load(path: str | Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older Lightning checkpoints pickle hyper-parameter objects; local, user-given file
        return torch.load(path, map_location="cpu", weights_only=False)


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
        raise ValueError(f"checkpoint {path} does not fit this model: {len(bad)} tensors missing or mis-shaped, "
                         f"e.g. {bad[:3]}. Is it a checkpoint of the same --model.backbone?")
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
                 include=None) -> dict:
    """ASI ranks for the last ``num_finetune`` fine-tuned layers of ``net`` (``layer_type``, ``include``) from a
    perplexity table under ``budget``.

    The table must have been measured for ``backbone``, cover those layers and (when ``input_shape`` is
    given) the same input shape; otherwise ValueError names the mismatch. Returns ``asi_core.ranks.select``'s
    result (budget_mib, per layer name/eps/ranks/memory_mib/perplexity, totals) plus the request and the
    table's provenance: what metrics.json["rank_selection"] holds.
    """
    names = finetune_candidates(net, num_finetune, layer_type, include)
    try:
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
        input_shape: Optional[List[int]] = None,
    ):
        """Classifier fine-tuned with activation compression.

        Args:
            backbone: Model-zoo name: mcunet (MCUNet-in1), mobilenet_v2, resnet18, resnet34, swin_t or vit_b_32
                (swin_tiny_test and vit_tiny_test: random-weight miniatures for tests).
            num_classes: Classes of the head; linked from --data.name, not set by hand.
            pretrained: Start from the published ImageNet weights (setup A). If they can be neither found
                under ckpts/imagenet/ nor downloaded, the run stops and names the file to provide.
            checkpoint: Start from this checkpoint instead (setup B: the pretraining run's file under ckpts/).
                Its head is reused when the class count matches.
            method: Activation compression: vanilla, gradfilter, hosvd or asi (asi_core.METHODS).
            num_finetune: Number of last layers (of --model.layer_type, matching --model.include) to train, or
                "all". Everything registered before the first of them is frozen.
            layer_type: What num_finetune counts: "conv" (nn.Conv2d) or "linear" (nn.Linear). Default: the
                backbone's (conv for the CNNs, linear for the transformers).
            include: Only layers whose qualified name matches: a regex searched in the name ("mlp") or a glob
                ("*.mlp.*"), or a list of them. Default: the backbone's ("mlp" for the transformers, as the paper
                counts their #Layers; none for the CNNs).
            ranks: asi: one rank for every mode of every layer, one list of per-mode ranks for every layer
                ([r1, r2, r3, r4] for a conv, one per input mode for a linear layer), or one such list per
                fine-tuned layer, in layer order. Default: 4, or chosen per layer from --model.perplexity_file
                (give one or the other).
            perplexity_file: asi: a perplexity.json of ``python main.py measure`` (same backbone, batch size and
                resolution, covering the fine-tuned layers); ranks are then chosen per layer under --model.budget
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
            scheduler: "cosine" annealing to 0 over the run (paper), or "constant".
            input_shape: Network input [batch size, 3, resolution, resolution]; linked from --data.batch_size and
                --data.resolution, not set by hand. Checked against --model.perplexity_file (None: not checked).
        """
        super().__init__()
        self.save_hyperparameters()
        if method not in asi_core.METHODS:
            raise ValueError(f"Unknown method {method!r}; valid choices: {', '.join(asi_core.METHODS)}")
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
        self.net = create_model(backbone, num_classes, pretrained=pretrained and checkpoint is None)
        if checkpoint is not None:
            load_checkpoint_weights(self.net, checkpoint, spec.head)
        options = {k: getattr(self.hparams, k) for k in METHOD_OPTIONS.get(method, ())}
        self.rank_selection: Optional[dict] = None  # set when ranks come from a perplexity file
        _check_rank_arguments(method, ranks, perplexity_file, budget)
        if perplexity_file is not None:
            self.rank_selection = select_ranks(self.net, backbone, num_finetune, perplexity_file, budget, input_shape,
                                               self.layer_type, self.include)
            options["ranks"] = [tuple(layer["ranks"]) for layer in self.rank_selection["layers"]]
        elif "ranks" in options:
            options["ranks"] = ranks_option(ranks)
        self.patched = asi_core.patch(self.net, method, num_finetune=num_finetune, lean=lean,
                                      layer_type=self.layer_type, include=self.include, **options)
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
        self.train(self.training)
        # top-1 accuracy over samples, as the paper reports (torchmetrics' default would be macro)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.criterion = nn.CrossEntropyLoss()

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
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

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
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else math.inf
        if hp.scheduler == "constant" and hp.warmup_epochs == 0:
            return opt
        if not math.isfinite(total):
            raise ValueError("the learning-rate schedule needs a finite run: set --trainer.max_epochs or max_steps")
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = int(round(total * hp.warmup_epochs / max_epochs))
        cosine = hp.scheduler == "cosine"

        def factor(step: int) -> float:  # linear warm-up, then cosine annealing (or constant) to the end
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
