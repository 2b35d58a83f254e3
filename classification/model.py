"""LightningModule: a model-zoo network fine-tuned with one of the methods of ``asi_core.METHODS`` (or LoRA).

The constructor composes the fine-tuning core (classification/finetune.py), in order: check the options -> build
the network -> weights -> adapters -> choose layers -> patch -> freeze -> recompute -> norm policy -> micro-batched
frozen prefix -> approximations (opt-in); the task the model spec names (classification/tasks.py; segmentation/task.py) brings the loss, the metrics and the monitored
metric. The optimiser recipe is ``finetune.configure_optimizers``.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from . import families  # noqa: F401  every model family registered
from . import finetune as core
from .finetune import (ASI_DEFAULT_RANKS, MODEL_METHODS, RandomBackboneWarning, bn_after_first,  # noqa: F401
                       check_layer_names, check_model_options, finetune_candidates, load_checkpoint_file,
                       load_checkpoint_weights, lr_factor, ranks_option, select_ranks)
from .registry import MODELS, get_spec
from .tasks import get_task

_BN = torch.nn.modules.batchnorm._BatchNorm


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
        frozen_micro_batch: Optional[int] = None,
        approx_activations: bool = False,
        saved_bits: Optional[int] = None,
    ):
        """Classifier fine-tuned with activation compression.

        Args:
            backbone: Model-zoo name: mcunet (MCUNet-in1), mobilenet_v2, resnet18, resnet34, swin_t or vit_b_32;
                timm:<name> or pretrainedmodels:<name> for those packages' models (docs/backbones.md)
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
            frozen_micro_batch: Run the frozen prefix (every layer before the first trainable parameter: no
                gradient, BatchNorm in eval mode) this many samples at a time and gather its output, so that its
                transient activations scale with N while the fine-tuned region sees the whole batch
                (asi_core.microbatch). The same outputs and gradients; lowers the whole-step peak where the frozen
                forward sets it (few fine-tuned layers: docs/peak_memory.md). None: the whole batch at once.
            approx_activations: Approximate (opt-in): GELU and SiLU modules keep a 2-bit code of their input and
                backward multiplies by a piecewise-constant derivative (asi_core.approx; forward unchanged). Their
                4C-wide inputs, which exact ASI must keep, shrink 16x. Accuracy: docs/approximate.md.
            saved_bits: Approximate (opt-in): keep what autograd saves inside the network's forward (norm, attention
                and gating inputs, trainable BatchNorm inputs) in 8, 4 or 2 bits per element, per group of 256
                (asi_core.approx; ASI's own Tucker form and the parameters stay exact). None: exact.
        """
        super().__init__()
        self.save_hyperparameters()
        hp = self.hparams
        for msg in core.check_options(hp, MODELS):  # the method and the numbers first, then the model's
            rank_zero_warn(msg)
        spec = get_spec(backbone)
        self.nonfinite_steps = 0  # training steps whose loss was NaN/inf (metrics.json, "diverged")
        self.paper_flops = spec.paper_flops  # how paper_gflops counts this model (resources, metrics.json)
        self.layer_type = layer_type or spec.layer_type
        self.include = include if include is not None else spec.include
        self.task = spec.task
        self.net = core.build(hp, spec)
        core.load_weights(self.net, hp, spec)
        adapters = core.add_adapters(self.net, hp, spec, self.layer_type, self.include)
        choice = core.choose_layers(self.net, hp, spec, self.layer_type, self.include, adapters)
        self.rank_selection: Optional[dict] = choice.rank_selection  # set when ranks come from a perplexity file
        self.patched = core.patch_layers(self.net, hp, self.layer_type, self.include, adapters, choice)
        rule_trainable = core.freeze(self.net, hp, adapters, choice)
        self.recomputed: list[str] = core.enable_recompute(self.net, self.patched, hp)
        self.bn_affine_trained = core.apply_norm_policy(self.net, hp, self.patched, choice, rule_trainable)
        self.micro_batched = core.micro_batch_prefix(self.net, hp)
        self.approximated = core.approximate_region(self.net, hp)
        self.train(self.training)
        self.objective = get_task(spec.task)(num_classes)
        self.monitor = self.objective.monitor  # what ModelCheckpoint keeps the best of
        self.criterion = self.objective.criterion()
        self.train_acc, self.val_acc, self.test_acc = self.objective.metrics()

    def random_targets(self, batch_size: int, resolution: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random labels for a (batch_size, 3, resolution, resolution) input (profile, benchmark)."""
        return self.objective.random_targets(batch_size, resolution, generator)

    def random_batch(self, batch_size: int, size: int, generator: Optional[torch.Generator] = None):
        """A random (input, labels) batch for this network: images of size x size, or ``size`` tokens."""
        return self.objective.random_batch(self.net, batch_size, size, generator)

    # ------------------------------------------------------------------ modes
    def setup(self, stage: str) -> None:
        """Where the network meets the data: a language model's vocabulary must cover the data's token ids."""
        embeddings = getattr(getattr(self.net, "model", None), "get_input_embeddings", None)
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if not getattr(self.net, "is_language_model", False) or embeddings is None or datamodule is None:
            return
        from .text_data import check_vocabulary
        sets = [getattr(datamodule, k, None) for k in ("train_set", "val_set", "test_set")]
        check_vocabulary([d for d in sets if d is not None], embeddings().num_embeddings, self.hparams.backbone,
                         getattr(datamodule, "tokenizer", None))

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
        if self.micro_batched:
            rank_zero_info(f"frozen prefix in micro-batches of {self.hparams.frozen_micro_batch}: "
                           + "; ".join(f"{name or 'the network'} runs {', '.join(prefix)}"
                                       for name, prefix in self.micro_batched))
        if self.approximated:
            acts = self.approximated.get("approximated_activations")
            rank_zero_info("approximate backward (asi_core.approx): "
                           + "; ".join(([f"{len(acts)} GELU/SiLU modules with 2-bit derivatives"] if acts else [])
                                       + ([f"saved tensors in {self.approximated['saved_bits']} bits"]
                                          if "saved_bits" in self.approximated else [])))

    def on_train_epoch_start(self):
        self.train(self.training)

    def forward(self, x):
        return self.net(x)

    # ------------------------------------------------------------------ steps (the task's)
    def training_step(self, batch, batch_idx):
        loss = self.objective.step(self, batch, "train", self.train_acc)
        if not torch.isfinite(loss):
            self.nonfinite_steps += 1
        return loss

    def validation_step(self, batch, batch_idx):
        self.objective.step(self, batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self.objective.step(self, batch, "test", self.test_acc)

    def on_validation_epoch_end(self):
        self.objective.epoch_end(self, "val", self.val_acc)

    def on_test_epoch_end(self):
        self.objective.epoch_end(self, "test", self.test_acc)

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

    # ------------------------------------------------------------------ recipe
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return core.configure_optimizers(self.trainable_parameters(), self.hparams, self.trainer)
