"""LightningModule: a model-zoo network (backbone + pooling + linear head) whose last
``num_finetune`` convolutions are trained with one of ``asi_core.METHODS``.

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

from .backbones import create_model, get_spec

# Which constructor arguments each method takes (forwarded to asi_core.patch as options).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "gradfilter": ("radius",),
    "hosvd": ("eps",),
    "asi": ("ranks", "warm_start"),
}

_BN = nn.modules.batchnorm._BatchNorm


def _torch_load(path: str | Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older Lightning checkpoints pickle hyper-parameter objects; local, user-given file
        return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint_weights(net: nn.Module, path: str | Path, head: str) -> list[str]:
    """Load the weights of a pretraining checkpoint into ``net``; return the keys that were skipped.

    Accepts a Lightning checkpoint of this project (keys ``net.*``), one exported to ckpts/ by a
    setup-B pretraining run, a plain state_dict, or keys prefixed ``model.``/``module.``.
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
    best = max(("", "net.", "model.", "module.", "model.model."),
               key=lambda p: sum(k[len(p):] in own for k in state if k.startswith(p)))
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


class ClassificationModel(pl.LightningModule):
    def __init__(
        self,
        backbone: str = "mcunet",
        num_classes: int = 10,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        method: str = "vanilla",
        num_finetune: Union[int, Literal["all"]] = 2,
        ranks: Union[int, List[Tuple[int, int, int, int]]] = 4,
        eps: float = 0.8,
        radius: int = 2,
        warm_start: bool = True,
        lean: Optional[bool] = None,
        set_bn_eval: bool = True,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 0,
        scheduler: Literal["cosine", "constant"] = "cosine",
    ):
        """Classifier fine-tuned with activation compression.

        Args:
            backbone: Model-zoo name: mcunet (MCUNet-in1), mobilenet_v2, resnet18 or resnet34.
            num_classes: Classes of the head; linked from --data.name, not set by hand.
            pretrained: Start from the published ImageNet weights (setup A). If they can be neither found
                under ckpts/imagenet/ nor downloaded, the run stops and names the file to provide.
            checkpoint: Start from this checkpoint instead (setup B: the pretraining run's file under ckpts/).
                Its head is reused when the class count matches.
            method: Activation compression: vanilla, gradfilter, hosvd or asi (asi_core.METHODS).
            num_finetune: Number of last Conv2d layers to train, or "all". Earlier layers are frozen.
            ranks: asi: one rank for every mode of every layer, or one (r1, r2, r3, r4) per fine-tuned layer,
                in layer order.
            eps: hosvd: explained-variance threshold in (0, 1] (paper: 0.8).
            radius: gradfilter: patch radius R >= 1 of gradient filtering.
            warm_start: asi: start each step's subspace iteration from the previous step's factors.
            lean: Memory-lean backward for frozen BN and ReLU in the fine-tuned region; None = asi_core's default.
            set_bn_eval: Keep every BatchNorm in eval mode and its affine parameters frozen (paper behaviour).
            optimizer: "sgd" (paper) or "adam".
            lr: Peak learning rate (paper: 0.05 downstream sets, 0.005 ImageNet setup B).
            momentum: SGD momentum (paper: 0 downstream, 0.9 ImageNet setup B).
            weight_decay: L2 weight decay (paper: 1e-4).
            warmup_epochs: Epochs of linear learning-rate warm-up (paper: 4 on ImageNet setup B).
            scheduler: "cosine" annealing to 0 over the run (paper), or "constant".
        """
        super().__init__()
        self.save_hyperparameters()
        if method not in asi_core.METHODS:
            raise ValueError(f"Unknown method {method!r}; valid choices: {', '.join(asi_core.METHODS)}")
        spec = get_spec(backbone)
        self.net = create_model(backbone, num_classes, pretrained=pretrained and checkpoint is None)
        if checkpoint is not None:
            load_checkpoint_weights(self.net, checkpoint, spec.head)
        options = {k: getattr(self.hparams, k) for k in METHOD_OPTIONS.get(method, ())}
        if "ranks" in options and not isinstance(options["ranks"], int):
            options["ranks"] = [tuple(r) for r in options["ranks"]]
        self.patched = asi_core.patch(self.net, method, num_finetune=num_finetune, lean=lean, **options)
        if set_bn_eval:
            for m in self.net.modules():
                if isinstance(m, _BN):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)
        self.criterion = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        """``set_bn_eval``: BatchNorm stays in eval mode whenever Lightning switches to training."""
        super().train(mode)
        if mode and self.hparams.set_bn_eval:
            for m in self.net.modules():
                if isinstance(m, _BN):
                    m.eval()
        return self

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
