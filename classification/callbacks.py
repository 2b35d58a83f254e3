"""Callbacks that record facts about a run into its metrics.json (see rundir.write_metrics).

Others add memory / FLOPs / timing recorders here; each writes its own keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import statistics
import time
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.plugins.io import TorchCheckpointIO

import asi_core
from asi_core.peak import inference_peak, peak_of

from .resources import MIB, PEAK_KEYS, ActivationMeter, layer_reports, totals
from .rundir import atomic_write, write_metrics


def weights_digest(module: torch.nn.Module) -> bytes:
    """SHA-256 over every parameter (name, dtype, shape, bytes) in registration order."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


class WeightsDigest(pl.Callback):
    """At the end of training every process hashes its weights; the hashes are gathered and rank 0
    writes ``weights_digests`` (one hex string per rank) and ``ranks_in_sync`` to metrics.json.

    Under DDP all ranks must end with identical weights; a mismatch is a bug worth seeing.
    (Compression buffers such as ASI's warm-start factors are per-rank state and are not hashed.)
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = torch.tensor(list(weights_digest(pl_module)), dtype=torch.uint8, device=pl_module.device)
        gathered = trainer.strategy.all_gather(mine.to(torch.int32))  # gloo has no uint8 all_gather everywhere
        gathered = gathered.reshape(-1, mine.numel()).cpu()
        digests = [bytes(row.to(torch.uint8).tolist()).hex() for row in gathered]
        if trainer.is_global_zero:
            write_metrics(trainer.default_root_dir, {"weights_digests": digests,
                                                     "ranks_in_sync": len(set(digests)) == 1})


class LastAtValidation(ModelCheckpoint):
    """last.ckpt written after every validation too (the CLI's other last.ckpt writer saves at epoch ends and at an
    interruption). A class of its own: Lightning keys a checkpoint callback's state by its class and monitor, and
    refuses two of one key."""


class ExactResume(pl.Callback):
    """A resumed fit continues exactly as the uninterrupted one would, from an epoch end or mid-epoch (SIGTERM, an
    exception), in epoch- and step-bounded modes alike. With the data module's sampler (data.EpochSampler: the order
    from (seed, epoch), each sample's augmentation from its own seed, nothing drawn from the global RNG by loading):

    - every checkpoint keeps the global random states (torch, CUDA, NumPy, Python): dropout, stochastic depth and
      anything else the training draws continue their sequence;
    - a checkpoint written at the end of an epoch is loaded as a completed epoch. (Lightning resumes such a
      checkpoint as "restarted on epoch end" when ``max_steps`` is set, and then skips the next epoch: a run with
      max_epochs 3, max_steps 300 and 15 batches per epoch, killed in epoch 1, ended at step 30, not 45);
    - the data module's training loader is made at the epoch resumed and, resumed mid-epoch, leaves out the samples
      of the batches already trained (Lightning cannot resume a plain DataLoader's position and would start the
      epoch's order again; its worker processes prefetch as soon as the iterator exists, before any epoch hook).

    Not exact: under DDP (Lightning replaces the sampler with a DistributedSampler), and a SIGTERM in the middle of
    a gradient-accumulation window (--trainer.accumulate_grad_batches: the partial gradients are not in the
    checkpoint)."""

    KEY = "asi_rng_states"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()  # plain values: checkpoints load weights_only
        checkpoint[self.KEY] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                          float(gauss)],
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get(self.KEY)
        if states:
            torch.set_rng_state(states["torch"])
            name, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])
        complete_ended_epoch(checkpoint)
        position = resume_position(checkpoint)
        datamodule = getattr(trainer, "datamodule", None)
        if position is not None and hasattr(datamodule, "resume_position"):
            datamodule.resume_position = position  # its training loader starts there (data.EpochSampler)


def resume_position(checkpoint: dict) -> Optional[tuple[int, int]]:
    """(the epoch a fit resumed from ``checkpoint`` trains next or continues, the batches of it already trained)."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return None
    current = epochs["current"]
    if current["started"] > current["processed"]:  # stopped inside an epoch
        return current["processed"], batches["current"]["completed"]
    return current["processed"], 0


def complete_ended_epoch(checkpoint: dict) -> bool:
    """Mark the epoch of a checkpoint written at its end (every batch done, the epoch not yet counted complete) as
    completed, its batch counters at the start of the next: the state Lightning itself resumes from without
    ``max_steps``. True if it changed the checkpoint."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return False
    if not all(e["ready"] == e["started"] == e["processed"] == e["completed"] + 1
               for e in (epochs["total"], epochs["current"])):
        return False
    for e in (epochs["total"], epochs["current"]):
        e["completed"] = e["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    return True


class RunStatus(pl.Callback):
    """metrics.json["status"] = "interrupted" (with the step) when a fit stops on an exception or a signal; the
    CLI writes "running" when a fit starts and "finished" or "diverged" when it ends."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        try:  # the first error is the one to keep: a failing write here must not replace it
            write_metrics(trainer.default_root_dir, {"status": "interrupted", "global_step": trainer.global_step,
                                                     "interrupted_by": type(exception).__name__,
                                                     "error": f"{type(exception).__name__}: {exception}"[:1000]})
        except Exception as err:  # (the disk that refused the checkpoint may refuse this too)
            rank_zero_warn(f"could not record the interruption in {trainer.default_root_dir}/metrics.json ({err}); "
                           f"the fit stopped on {type(exception).__name__}: {exception}")


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt at every epoch end and at an interruption. A write that fails while the fit is already stopping (a
    full disk refusing the checkpoint again) is said, and the error that stopped the fit is the one raised (it was
    replaced by the second failure); the previous last.ckpt stays whole (atomic writes)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            super().on_exception(trainer, pl_module, exception)
        except Exception as err:
            rank_zero_warn(f"last.ckpt could not be written at the interruption ({type(err).__name__}: {err}); the "
                           f"previous one is kept. The fit stopped on {type(exception).__name__}: {exception}")


class ResourceAccounting(pl.Callback):
    """What a training step of the fine-tuned layers costs, per epoch: ``resources/*`` in the loggers and
    ``metrics.json["resources"]`` (rewritten at every epoch end, so the file holds the last epoch).

    * Analytic activation memory (``activation_mib`` mean, ``activation_mib_peak``) and FLOPs per step
      (``forward_gflops``, ``backward_gflops`` = weight gradient, ``overhead_gflops`` (eq. 11 / 14 /
      pooling), ``core_gflops``, ``input_grad_gflops``, ``train_gflops`` = forward + backward + overhead +
      core, ``paper_gflops`` = the paper's formulas as written; each also as ``<key>_peak``), from every
      patched layer's ``last_stats`` after every training batch (classification/resources.py,
      asi_core/accounting.py). They are constant for vanilla/gradfilter/asi and vary with the ranks HOSVD_eps
      picks (the paper reports HOSVD's peak): means and peaks are taken over the epoch's full-size batches (a smaller last batch is left out, so the figures are per batch of
      ``batch_size``). ``layers``: the last batch's per-layer reports, with ``memory_mib_mean``/``_peak``.
    * Measured activation memory (``measured_activation_mib``, of it ``measured_mask_mib``; per layer
      ``measured_mib``): once, on the first training batch of the fit, by ``resources.ActivationMeter``
      from the first fine-tuned layer's forward until ``on_before_backward`` (the loss included). The
      meter only watches: that batch trains exactly as the others.
    * The whole-step peak (``peak_step_mib``, ``peak_step_breakdown``, ``training_overhead_mib``, ...: the keys of
      ``resources.PEAK_KEYS``, asi_core/peak.py): once, on the first training batch after the first optimiser step
      (so the optimiser state exists, as in every later step), from ``on_train_batch_start`` to
      ``on_train_batch_end`` (forward, backward, clipping, the update), then an inference forward of that batch
      (eval, no_grad) for ``training_overhead_mib``. None in a fit of one batch.
    * Wall time per phase, median over the epoch's batches (``timing``): ``forward_s`` from
      ``on_train_batch_start`` to ``on_before_backward`` (training_step: forward, loss, logging),
      ``backward_s`` to ``on_after_backward``, ``optimizer_s`` from ``on_before_optimizer_step`` to
      ``on_train_batch_end`` (gradient clipping and the update). CUDA is synchronised at each mark.
    """

    def __init__(self):
        self._meter = None
        self._measure_pending = True  # measured on the first training batch of the fit, then never again
        self._measured: Optional[dict] = None
        self._measured_layers: dict[str, float] = {}
        self._input_requires_grad: Optional[dict[str, bool]] = None
        self._marks: dict[str, float] = {}
        self._peak_pending, self._peak_stack, self._peak = True, None, None
        self._reset()

    def _reset(self) -> None:
        self._times = {"forward_s": [], "backward_s": [], "optimizer_s": []}
        self._by_batch_size: dict[int, dict] = {}  # batch size -> running sums of this epoch

    @staticmethod
    def _net(pl_module):
        return getattr(pl_module, "net", pl_module)

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ per batch
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._measure_pending:
            self._measure_pending = False
            if asi_core.patched_layers(self._net(pl_module)):
                self._meter = ActivationMeter(self._net(pl_module), exclude=[pl_module]).start()
        elif self._peak_pending and trainer.global_step >= 1:  # the optimiser state exists: a step like every later one
            self._peak_pending, self._peak_stack = False, contextlib.ExitStack()
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self._peak = self._peak_stack.enter_context(peak_of(pl_module, optimizer, batch, pl_module.device))
        self._marks = {"start": self._now(pl_module)}

    def _finish_peak(self, pl_module, batch) -> None:
        if self._peak_stack is None:
            return
        stack, self._peak_stack = self._peak_stack, None
        stack.close()
        self._peak["inference_peak_mib"] = inference_peak(pl_module, batch[0], batch, pl_module.device)
        self._peak["training_overhead_mib"] = self._peak["peak_step_mib"] - self._peak["inference_peak_mib"]

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._peak_stack is not None:
            self._peak_stack.close()
            self._peak_stack, self._peak = None, None

    def _stop_meter(self) -> None:
        if self._meter is None:
            return
        meter, self._meter = self._meter.stop(), None
        if meter.started:
            self._measured = meter.summary()
            self._measured_layers = {k: v / MIB for k, v in meter.layer_bytes.items()}
            self._input_requires_grad = dict(meter.input_requires_grad)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._marks["before_backward"] = self._now(pl_module)
        self._stop_meter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._marks["after_backward"] = self._now(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._marks["before_optimizer"] = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = self._now(pl_module)
        self._stop_meter()  # in case no backward ran on this batch
        self._finish_peak(pl_module, batch)
        m = self._marks
        for key, a, b in (("forward_s", "start", "before_backward"), ("backward_s", "before_backward", "after_backward"),
                          ("optimizer_s", "before_optimizer", None)):
            if a in m and (b is None or b in m):
                self._times[key].append((m[b] if b else end) - m[a])
        reports = layer_reports(self._net(pl_module), self._input_requires_grad,
                                getattr(pl_module, "paper_flops", "equations"))
        if not reports:
            return
        tot = totals(reports)
        acc = self._by_batch_size.setdefault(reports[0]["input_shape"][0], {
            "n": 0, "sums": {}, "peaks": {}, "layer_sum": {}, "layer_peak": {}})
        acc["n"] += 1
        for k, v in tot.items():
            acc["sums"][k] = acc["sums"].get(k, 0.0) + v
            acc["peaks"][k] = max(acc["peaks"].get(k, v), v)
        for rep in reports:
            name, mib = rep["name"], rep["memory_mib"]
            acc["layer_sum"][name] = acc["layer_sum"].get(name, 0.0) + mib
            acc["layer_peak"][name] = max(acc["layer_peak"].get(name, 0.0), mib)
        acc["last"] = reports

    # ------------------------------------------------------------------ per epoch
    def summary(self) -> Optional[dict]:
        """The ``resources`` entry for the epoch so far (None before a training batch)."""
        if not self._by_batch_size:
            return None
        batch_size = max(self._by_batch_size)
        acc = self._by_batch_size[batch_size]
        n = acc["n"]
        out = {k: v / n for k, v in acc["sums"].items()}
        out["num_layers"] = int(round(out["num_layers"]))
        out.update({f"{k}_peak": v for k, v in acc["peaks"].items() if k == "activation_mib" or k.endswith("_gflops")})
        out.update(self._measured or {"measured_activation_mib": None, "measured_mask_mib": None,
                                      "measured_layers_mib": None})
        out.update({k: (self._peak or {}).get(k) for k in PEAK_KEYS})
        out["timing"] = {k: (statistics.median(v) if v else None) for k, v in self._times.items()}
        out["timing"]["batches"] = len(self._times["forward_s"])
        layers = []
        for rep in acc["last"]:
            rep = dict(rep, memory_mib_mean=acc["layer_sum"][rep["name"]] / n,
                       memory_mib_peak=acc["layer_peak"][rep["name"]])
            if rep["name"] in self._measured_layers:
                rep["measured_mib"] = self._measured_layers[rep["name"]]
            layers.append(rep)
        out.update(layers=layers, batch_size=batch_size, batches=n)
        return out

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        res = self.summary()
        if res is None:
            return
        res["epoch"] = trainer.current_epoch
        res["paper_flops"] = getattr(pl_module, "paper_flops", "equations")  # how paper_gflops counted
        scalars = {f"resources/{k}": v for k, v in res.items()
                   if isinstance(v, (int, float)) and k not in ("epoch", "batches", "batch_size", "num_layers")}
        scalars.update({f"resources/timing/{k}": v for k, v in res["timing"].items()
                        if v is not None and k != "batches"})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        if trainer.is_global_zero:
            write_metrics(trainer.default_root_dir, {"resources": res})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files (``rundir.atomic_write``): Lightning writes
    ``last.ckpt`` in place, so a full disk or a kill during the write left a truncated file that the next
    ``--ckpt_path last`` could not load. Other filesystems (s3://, ...) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
