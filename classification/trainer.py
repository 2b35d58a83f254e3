"""The project's own subcommands, as methods of a Lightning ``Trainer`` subclass.

LightningCLI builds the parser of a subcommand from the method of that name of its ``trainer_class`` (its typed,
documented parameters become the options; ``model`` and ``datamodule`` are the instantiated classes) and runs it
between the CLI's ``before_<name>`` and ``after_<name>`` hooks. ``ASITrainer`` adds three:

* ``profile``: activation memory and FLOPs of one training step on random input (classification/resources.py);
* ``benchmark``: step latency per method (classification/benchmark.py), options ``--benchmark.*``;
* ``measure``: the activation perplexity table of ASI's rank selection (classification/measure.py), ``--measure.*``.

``benchmark`` and ``measure`` take their options as one dataclass parameter named like the subcommand, which
jsonargparse turns into the nested ``--measure.epsilons ...`` options and a ``measure:`` section of a --config file.
jsonargparse also names a method's own option group after the method, so a method ``measure`` with a parameter
``measure`` would make two groups of one name: the methods are defined as ``measure_command`` (and
``benchmark_command``) and the subcommand names are class attributes pointing at them.

The CLI hands over what the commands need beyond the model and data as attributes (classification/cli.py,
``ASICLI.instantiate_trainer``): ``run_dir``, ``model_args`` (the resolved --model options) and ``seed``. Each
command leaves its result in ``<name>_result`` (the CLI copies it onto itself).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Union

from pytorch_lightning import Trainer

from .data import input_shape_of
from .measure import PAPER_EPSILONS, PERPLEXITY_FILE


@dataclass
class BenchmarkOptions:
    """Latency of training steps per method on random input, interleaved in one process (paper Fig. 5).

    The options of ``main.py benchmark`` (``--benchmark.*``); the first line titles their group in --help.

    Args:
        methods: Comma-separated (or a list) subset of vanilla,gradfilter,hosvd,asi; each may carry
            +checkpointing, +recompute, +micro (the frozen prefix in micro-batches of --model.frozen_micro_batch,
            default 8), +approx (2-bit activation derivatives and saved tensors in --model.saved_bits bits, default
            8: asi_core.approx) or +approx+recompute (e.g. vanilla,vanilla+checkpointing,asi,asi+micro,asi+approx)
            to time that variant beside it.
        steps: Timed steps per method (medians are reported).
        warmup: Untimed steps per method first.
        per_layer: Also time each fine-tuned layer's weight-gradient computation alone.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        compile: Also time every method with its network under torch.compile (METHOD+compile; the warm-up steps
            compile it; the patched layers' training step runs eagerly inside: docs/asi_core_api.md).
    """

    methods: Union[List[str], str] = "vanilla,gradfilter,hosvd,asi"
    steps: int = 5
    warmup: int = 1
    per_layer: bool = False
    device: str = "auto"
    compile: bool = False


@dataclass
class MeasureOptions:
    """Measure the activation perplexity table that --model.perplexity_file/--model.budget select ASI ranks from.

    The options of ``main.py measure`` (``--measure.*``); the first line titles their group in --help.

    Args:
        epsilons: Explained-variance thresholds, comma-separated ("0.4,0.5") or a list (paper: 0.4,...,0.9).
        num_batches: K: full training batches to average the perplexity over (ranks: the largest seen).
        num_finetune: Measure the last N conv layers, or "all"; fine-tuning may use any subset of them.
        out: Output JSON path; default runs/setup<A|B>/<model>/<dataset>/measure/<exp_name>/perplexity.json
            with exp_name l<num_finetune>_bs<batch_size>_res<resolution>. The PNG goes next to it.
        overwrite: Re-measure even if the output already holds a table with the same settings.
        full_rank_factors: Count a mode kept whole (rank = D) as a D x D factor in memory_mib, as the authors'
            measurement does (to reproduce their rank choices; with --measure.num_batches 1 and
            --data.batch_size 128, their protocol). Default: no factor, what ASI stores.
    """

    epsilons: Union[List[float], str] = PAPER_EPSILONS
    num_batches: int = 1
    num_finetune: Union[int, Literal["all"]] = "all"
    out: Optional[str] = None
    overwrite: bool = False
    full_rank_factors: bool = False


def _sample_size(datamodule, model=None) -> tuple[Optional[int], int]:
    """(tokens per sample for a text dataset or a language model, else None; the size the benchmark builds inputs
    of). A language model profiled with an image dataset configured takes --data.max_length tokens (not the
    image resolution, which it used to)."""
    shape = input_shape_of(datamodule.batch_size, datamodule.resolution, datamodule.name, datamodule.max_length)
    tokens = shape[1] if len(shape) == 2 else None  # text: (batch, tokens)
    if tokens is None and getattr(getattr(model, "net", None), "is_language_model", False):
        tokens = datamodule.max_length
    return tokens, datamodule.resolution if tokens is None else tokens


# No class docstring on purpose: jsonargparse titles the --trainer.* option group with the nearest class docstring
# in the MRO, and that title must stay Trainer's ("Customize every aspect of training via flags"). What this class
# adds is described in the module docstring above.
class ASITrainer(Trainer):
    SUBCOMMANDS = ("profile", "benchmark", "measure")  # in the order of ``main.py --help``

    run_dir: Optional[Path] = None  # the run directory (set by the CLI)
    model_args: Optional[dict] = None  # the resolved --model options (set by the CLI)
    seed: Optional[int] = None  # --seed_everything as resolved (set by the CLI)

    def profile(self, model, datamodule, device: str = "auto"):
        """One training step on random input: activation memory (analytic and measured) and FLOPs of the
        fine-tuned layers, printed as one JSON object on the last line of stdout.

        Random weights (--model.pretrained is forced to false, no setup-B checkpoint is looked for) and a random
        batch of shape (--data.batch_size, 3, --data.resolution, --data.resolution), for an LLM backbone random token
        ids (--data.batch_size, tokens: --data.max_length, 65 for digits_tokens): no dataset, no download. LLMs run
        shape-only (--model.shape_only, fake tensors: real shapes and saved tensors, no arithmetic, no memory).
        asi uses --model.ranks, whose default is 1 here (4 for fit); ranks given on the command line or in a
        --config file, or chosen from --model.perplexity_file, win. classification/resources.py documents the figures.

        Args:
            device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        """
        from .resources import profile_report

        tokens, _ = _sample_size(datamodule, model)
        out = profile_report(model, datamodule.batch_size, datamodule.resolution, device, max_length=tokens)
        print(json.dumps(out), flush=True)
        self.profile_result = out

    def benchmark_command(self, model, datamodule, benchmark: BenchmarkOptions = BenchmarkOptions()):
        """Latency of training steps per method on random input, interleaved in one process (paper Fig. 5).

        Builds one network per method from the --model arguments (random weights, --model.pretrained forced to
        false) and times forward, backward and optimiser step on a random batch of shape (--data.batch_size, 3,
        --data.resolution, --data.resolution), methods interleaved (A B C D A B C D ...) after warm-up. Prints one
        JSON object as the last stdout line: {"config", "methods": {name: {forward_s, backward_s, optimizer_s,
        step_s}} (medians), "ratios_to_vanilla" (time ratios, < 1 is faster), "speedup_vs_vanilla"}, and with
        per_layer the weight-gradient computation of each fine-tuned layer timed alone. asi uses --model.ranks
        (default 2 here: rank 2 on every mode of every layer), hosvd --model.eps, gradfilter --model.radius.
        The options: ``BenchmarkOptions``.
        """
        from .benchmark import benchmark_models

        b = benchmark
        names = [m.strip() for m in b.methods.split(",")] if isinstance(b.methods, str) else list(b.methods)
        _, size = _sample_size(datamodule, model)
        out = benchmark_models(self.model_args, names, datamodule.batch_size, size, steps=b.steps, warmup=b.warmup,
                               per_layer=b.per_layer, device=b.device, compile=b.compile)
        print(json.dumps(out), flush=True)
        self.benchmark_result = out

    def measure_command(self, model, datamodule, measure: MeasureOptions = MeasureOptions()):
        """Measure the activation perplexity table that --model.perplexity_file/--model.budget select ASI ranks from.

        Per conv layer and eps (paper Sec. 3.3): the HOSVD ranks, the compressed memory (eq. 5, MiB) and the
        activation perplexity (eq. 7) on training batches, written to perplexity.json and a PNG. The model is built
        as fit builds it (weights, --model.checkpoint, setup B) but vanilla and never optimised: --model.method,
        ranks and num_finetune are ignored. See classification/measure.py. The options: ``MeasureOptions``.
        """
        from .measure import run_measure

        m = measure
        path = Path(m.out) if m.out else self.run_dir / PERPLEXITY_FILE
        self.measure_result = run_measure(
            model, datamodule, path=path, epsilons=m.epsilons, num_batches=m.num_batches, num_finetune=m.num_finetune,
            overwrite=m.overwrite, device=self.strategy.root_device, seed=self.seed,
            progress=self.progress_bar_callback is not None, full_rank_factors=m.full_rank_factors)

    benchmark = benchmark_command
    measure = measure_command
