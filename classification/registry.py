"""The model and dataset registries (timm's ``register_model`` pattern): a name -> spec dict each, filled by the
families themselves when their module is imported. This module imports no family (and not torch).

* A model family registers each network with ``@register_model(name, **spec_fields)`` on its ``create`` function,
  the one builder signature of every family: ``create(num_classes, pretrained, **options) -> nn.Module`` (a network
  with a ``num_classes`` head; ``pretrained``: its published weights, never random ones in their place).
  Plain ImageNet classifiers (``builder() -> 1000-class network``) are wrapped into such a ``create`` once, by
  :func:`classification.weights.classifier_create`.
* A dataset family registers each dataset with ``register_dataset(name, **spec_fields)``.
* :mod:`classification.families` is the one import list that registers every family; import it (or anything that
  does, e.g. ``classification.cli``) before looking a name up.

Families: CNNs and vision transformers (``classification/backbones.py``), LLMs (``classification/llm.py``),
segmentation networks (``segmentation/models.py``); image datasets (``classification/data.py``), text datasets
(``classification/text_data.py``), segmentation datasets (``segmentation/data.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # annotations only: importing the registry loads no torch
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    builder: Optional[Callable[[], nn.Module]]  # ImageNet-shaped network, random init (None: only create builds it)
    head: str                         # dotted path of the final layer (nn.Linear; segmentation: the 1x1 conv_seg)
    weights_url: str                  # published ImageNet weights (LLMs: the hub name; "" when none)
    weights_file: str                 # file name under <ckpt_dir>/imagenet/ ("" when none)
    resolution: int                   # native ImageNet resolution (informative)
    layer_type: str = "conv"          # what --model.num_finetune counts by default (asi_core.patch's layer_type)
    include: Optional[str] = None     # default name filter of those layers (asi_core.patch's include), e.g. "mlp"
    task: str = "classification"      # "segmentation": (B, K, H, W) logits, pixel labels (segmentation/)
    # the family's builder, one signature for every family: create(num_classes, pretrained, **options) -> network
    # with its head (set by register_model; plain classifiers: classification.weights.classifier_create)
    create: Optional[Callable[..., nn.Module]] = None
    fixed_resolution: Optional[int] = None  # the only input size the architecture takes (ViT: position embeddings)
    # How ``paper_gflops`` counts this model's layers, in the paper's own units (asi_core.accounting.PAPER_COUNTS):
    # "equations" (eq. 11-17 as written, a multiply-add one FLOP: the CNNs of Tables 1-3), "authors_linear" (the
    # authors' model_linear.py: Swin-T/ViT, Table 2's 0.11/0.23 TFLOPs for vanilla at 2/4 layers) or "authors_llm"
    # (their model_llm.py: Table 4). Every other *_gflops figure is ours: one multiply-add = one FLOP.
    paper_flops: str = "equations"
    # the unit the report's table shows paper_gflops in: "GFLOPs", or "TFLOPs" (the LLMs, as Table 4)
    paper_flops_unit: str = "GFLOPs"
    # ---- family hooks, called by the model core instead of switching on names (defaults: "not this family")
    # the family's own --model options, handed to create (LLMs: name_or_path, shape_only, num_blocks); a model
    # with none takes no options
    options: tuple[str, ...] = ()
    # text models: the tokenizer to use for a given --model.name_or_path (LLMs: classification.llm.source_of)
    tokenizer_source: Optional[Callable[[Optional[str]], Optional[str]]] = None
    shape_only_profile: bool = False  # ``profile`` builds it shape-only (FakeTensorMode) by default (LLMs)
    # segmentation: the authors' explicit layer lists for a --model.num_finetune value ({"layers", "radii",
    # "freeze"} or None; segmentation.layer_sets.layer_set)
    layer_sets: Optional[Callable[[object], Optional[dict]]] = None
    # the package's own preprocessing of a model from another package ({"mean", "std": [3 floats, RGB, inputs in
    # [0, 1]], "input_size": int}); the command line hands it to the data (classification/hub_models.py). None: ours
    preprocessing: Optional[dict] = None
    # maps a published state_dict onto the architecture's keys before the strict load (pretrainedmodels renames
    # torchvision's head `fc` to `last_linear`); None: loaded as it is
    weights_rename: Optional[Callable[[dict, "nn.Module"], dict]] = None


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    # (root: Path, download: bool, *, resolution, tokenizer, max_length) -> (train pool, official test set or None);
    # a builder takes the keywords it needs and ignores the others (**_)
    build: Optional[Callable]
    how_to_obtain: str
    kind: str = "image"  # "text": token datasets (text_data.py), batches are dicts of (B, L) tensors
    task: str = "classification"  # "segmentation": (image, (H, W) label map) samples, its own splits
    make_sets: Optional[Callable] = None  # (root, resolution, seed) -> (train, val, test); replaces build + splits
    eval_batch_size: Optional[int] = None  # val/test batch size when images differ in size (VOC: 1, as mmseg)
    # ---- what generic code asks instead of comparing names (defaults: "not this kind of dataset")
    in_memory: bool = False  # built in memory as ready tensors (digits, the text sets): no image transforms
    downloadable: bool = False  # prepare_data builds the pool once with --data.download true (torchvision sets)
    tokens: Optional[int] = None  # fixed tokens per sample of a text set (digits_tokens: 65); None: --data.max_length
    # --data.augment paper (the authors' preprocessing): normalisation (mean, std), None: ImageNet's; and whether they
    # random-resized-crop + flip (ImageNet; on the evaluation split too in setup A) instead of resizing only
    paper_stats: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
    paper_random_crop: bool = False


MODELS: dict[str, ModelSpec] = {}
DATASETS: dict[str, DatasetSpec] = {}
# "<prefix>:<name>" models built on demand from another package (classification/hub_models.py: timm, pretrainedmodels):
# prefix -> (resolve(name), which registers "<prefix>:<name>", and a line saying which names it takes)
MODEL_SOURCES: dict[str, tuple[Callable[[str], None], str]] = {}


def _refuse_duplicate(table: dict, what: str, name: str) -> None:
    if name in table:
        raise ValueError(f"a {what} named {name!r} is already registered; each {what} name is registered once "
                         f"(choose another name)")


def register_model(name: str, **spec_fields) -> Callable[[Callable], Callable]:
    """Decorator registering ``create(num_classes, pretrained, **options) -> nn.Module`` as model ``name``, with the
    :class:`ModelSpec` fields ``spec_fields``; returns ``create`` unchanged. A name registered twice: ValueError."""
    _refuse_duplicate(MODELS, "model", name)
    if "create" in spec_fields:
        raise TypeError("register_model decorates the create function; do not pass create=")

    def decorate(create: Callable) -> Callable:
        _refuse_duplicate(MODELS, "model", name)
        MODELS[name] = ModelSpec(create=create, **spec_fields)
        return create

    return decorate


def register_dataset(name: str, **spec_fields) -> DatasetSpec:
    """Register dataset ``name`` with the :class:`DatasetSpec` fields ``spec_fields``; returns its spec. A name
    registered twice: ValueError."""
    _refuse_duplicate(DATASETS, "dataset", name)
    spec = DatasetSpec(**spec_fields)
    DATASETS[name] = spec
    return spec


def register_model_source(prefix: str, resolve: Callable[[str], None], names: str) -> None:
    """Models named ``<prefix>:<name>``: ``resolve(name)`` registers ``"<prefix>:<name>"`` (with
    :func:`register_model`) the first time it is looked up, or raises ValueError saying why it cannot. ``names``: a
    line for error messages saying which names the source takes."""
    _refuse_duplicate(MODEL_SOURCES, "model source", prefix)
    MODEL_SOURCES[prefix] = (resolve, names)


def _choices() -> str:
    return ", ".join([*MODELS, *(f"{p}:<name> ({names})" for p, (_, names) in MODEL_SOURCES.items())])


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        prefix, sep, arch = str(name).partition(":")
        if not (sep and arch and prefix in MODEL_SOURCES):
            raise ValueError(f"Unknown model {name!r}; valid choices: {_choices()}")
        try:
            MODEL_SOURCES[prefix][0](arch)  # registers it, or raises ValueError saying why not
        except ValueError:
            raise
        except Exception as err:  # the package failed building it: say which model and why, as an unknown name
            raise ValueError(f"model {name!r} could not be built by {prefix} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:300] if str(err) else ''})") from err
    return MODELS[name]


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model or one a model source can build (it is registered then)."""
    try:
        get_spec(name)
    except ValueError:
        return False
    return True


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    return DATASETS[name]


def create_model(name: str, num_classes: int, pretrained: bool = True, **options) -> nn.Module:
    """The network ``name`` with a fresh ``num_classes`` head, built by its family's ``create``.

    ``pretrained=True`` loads the published weights (ImageNet for the CNNs and vision transformers, see
    ``classification.backbones.load_imagenet_weights``; the LLMs' from ``--model.name_or_path``/ckpts/hf/the hub)
    before the head is replaced; it raises rather than fall back to random weights. ``options``: the family's own
    (``ModelSpec.options``); a model without options refuses any.
    """
    spec = get_spec(name)
    if options and not spec.options:
        raise ValueError(f"model {name!r} takes no options {sorted(options)} (they are for the LLM backbones)")
    return spec.create(num_classes, pretrained, **options)
