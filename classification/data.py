"""Datasets, setups A/B and splits, behind one LightningDataModule (``ClassificationData``).

* Setup A: the whole training pool of a downstream dataset (the backbone was pretrained on ImageNet).
* Setup B: the training pool is split into two label-skewed, non-IID halves (FedAvg-style shards,
  paper App. B.1); half 1 is for pretraining, half 2 for fine-tuning. The partition is written to
  ``<run_dir>/partition.json`` and can be reloaded with ``--data.partition_file``.
* Either way the chosen pool is split 80/20 into train/val with a fixed seed (``split_seed``).
  ``test`` uses the dataset's official test split when it has one, else the val split.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes),
upsampled to RGB at ``resolution``: no download, used by the demo and the tests.

The image datasets register themselves here (``classification.registry.register_dataset``), the text ones in
text_data.py, the segmentation ones in segmentation/data.py. ``ClassificationData`` and the functions below read
only their specs (no dataset name is special here). ``DATASETS`` and ``get_dataset_spec`` are still importable from
this module (the registry's, every family registered by ``classification.families`` on first use).
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from . import registry
from .registry import DatasetSpec, register_dataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- datasets
class DigitsDataset(Dataset):
    """scikit-learn digits as ``(3, R, R)`` float tensors normalised to [-1, 1]."""

    def __init__(self, resolution: int = 32):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.targets = [int(t) for t in d.target]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def _digits(root: Path, download: bool, resolution: int = 32, **_):
    return DigitsDataset(resolution), None


def _tv_dataset(cls_name: str, train_kw: Sequence[dict], test_kw: Optional[dict]):
    """Builder for a torchvision dataset class; a pool made of several splits is concatenated."""

    def build(root: Path, download: bool, **_):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        pools = [cls(str(root), download=download, **kw) for kw in train_kw]
        pool = pools[0] if len(pools) == 1 else ConcatDataset(pools)
        test = cls(str(root), download=download, **test_kw) if test_kw is not None else None
        return pool, test

    return build


def _image_folder(train_dir: str, test_dir: Optional[str]):
    def build(root: Path, download: bool, **_):
        from torchvision.datasets import ImageFolder

        for d in [train_dir] + ([test_dir] if test_dir else []):
            if not (root / d).is_dir():
                raise FileNotFoundError(f"missing folder {root / d}")
        return ImageFolder(str(root / train_dir)), (ImageFolder(str(root / test_dir)) if test_dir else None)

    return build


# ----------------------------------------------------------------------------- registration
CIFAR_STATS = ((0.5,) * 3, (0.5,) * 3)  # the authors normalise CIFAR with mean = std = 0.5 (--data.augment paper)

register_dataset("digits", num_classes=10, build=_digits, how_to_obtain="bundled with scikit-learn; nothing to download",
                 in_memory=True)
register_dataset(
    "cifar10", num_classes=10, build=_tv_dataset("CIFAR10", [dict(train=True)], dict(train=False)),
    how_to_obtain="torchvision CIFAR10: pass --data.download true once online, or extract cifar-10-python.tar.gz "
    "(https://www.cs.toronto.edu/~kriz/cifar.html) so that <root>/cifar10/cifar-10-batches-py/ exists",
    downloadable=True, paper_stats=CIFAR_STATS)
register_dataset(
    "cifar100", num_classes=100, build=_tv_dataset("CIFAR100", [dict(train=True)], dict(train=False)),
    how_to_obtain="torchvision CIFAR100: pass --data.download true once online, or extract cifar-100-python.tar.gz "
    "(https://www.cs.toronto.edu/~kriz/cifar.html) so that <root>/cifar100/cifar-100-python/ exists",
    downloadable=True, paper_stats=CIFAR_STATS)
register_dataset(
    "flowers102", num_classes=102,
    build=_tv_dataset("Flowers102", [dict(split="train"), dict(split="val")], dict(split="test")),
    how_to_obtain="torchvision Flowers102: pass --data.download true once online, or put 102flowers.tgz (extracted: "
    "jpg/), imagelabels.mat and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ "
    "in <root>/flowers102/flowers-102/",
    downloadable=True)
register_dataset(
    "pets", num_classes=37, build=_tv_dataset("OxfordIIITPet", [dict(split="trainval")], dict(split="test")),
    how_to_obtain="torchvision OxfordIIITPet: pass --data.download true once online, or extract images.tar.gz and "
    "annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ into <root>/pets/oxford-iiit-pet/",
    downloadable=True)
# ImageFolder sets: nothing to download, but prepare_data still builds them once with --data.download true (checks
# their folders), as it always has
register_dataset(
    "cub200", num_classes=200, build=_image_folder("train", "test"),
    how_to_obtain="CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/) in ImageFolder layout: "
    "<root>/cub200/train/<class>/*.jpg and <root>/cub200/test/<class>/*.jpg "
    "(split with the archive's train_test_split.txt; see docs/datasets.md)",
    downloadable=True)
register_dataset(
    "imagenet", num_classes=1000, build=_image_folder("train", "val"),
    how_to_obtain="ImageNet-1k (ILSVRC2012, https://image-net.org/download) in ImageFolder layout: "
    "<root>/imagenet/train/<wnid>/*.JPEG and <root>/imagenet/val/<wnid>/*.JPEG",
    downloadable=True, paper_random_crop=True)


def _registered() -> dict[str, DatasetSpec]:
    """The dataset registry with every family registered: ``classification.families`` imports this module, so it is
    imported here, on first use, not at the top."""
    from . import families  # noqa: F401
    return registry.DATASETS


def get_dataset_spec(name: str) -> DatasetSpec:
    _registered()
    return registry.get_dataset_spec(name)


def __getattr__(attr: str):
    """``DATASETS``, as this module exported it: the registry's, every family registered."""
    if attr == "DATASETS":
        return _registered()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def num_classes_of(name: str) -> int:
    """Number of classes of a registered dataset (used to size the model's head)."""
    return get_dataset_spec(name).num_classes


def input_shape_of(batch_size: int, resolution: int, name: Optional[str] = None,
                   max_length: Optional[int] = None) -> list[int]:
    """Network input shape of a batch: ``[batch_size, 3, resolution, resolution]`` (every image dataset is RGB), or
    ``[batch_size, tokens]`` for a text dataset (``name``: its ``max_length``; digits_tokens: 65)."""
    spec = _registered().get(name) if name is not None else None
    if spec is not None and spec.kind == "text":
        return [batch_size, spec.tokens if spec.tokens is not None else int(max_length or 512)]
    return [batch_size, 3, resolution, resolution]


def dataset_targets(ds: Dataset) -> list[int]:
    """Labels of a dataset without loading its images."""
    if isinstance(ds, ConcatDataset):
        return [t for d in ds.datasets for t in dataset_targets(d)]
    if isinstance(ds, Subset):
        base = dataset_targets(ds.dataset)
        return [base[i] for i in ds.indices]
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


# ----------------------------------------------------------------------------- setup B partition
def label_skewed_halves(targets: Sequence[int], num_shards: int = 20, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split sample indices into two label-skewed halves (FedAvg's non-IID shards, McMahan et al. 2017).

    Indices are sorted by label, cut into ``num_shards`` contiguous shards, and a seeded random half
    of the shards goes to each part. Fewer shards -> stronger skew. Deterministic in ``seed``.
    """
    if num_shards < 2 or num_shards % 2:
        raise ValueError(f"num_shards must be an even number >= 2, got {num_shards}")
    order = np.argsort(np.asarray(targets), kind="stable")
    shards = np.array_split(order, num_shards)
    perm = np.random.default_rng(seed).permutation(num_shards)
    halves = ([], [])
    for k, s in enumerate(perm):
        halves[0 if k < num_shards // 2 else 1].extend(int(i) for i in shards[s])
    return sorted(halves[0]), sorted(halves[1])


def save_partition(path: Path, halves, targets: Sequence[int], meta: dict) -> None:
    num_classes = int(max(targets)) + 1
    counts = [np.bincount(np.asarray(targets)[h], minlength=num_classes).tolist() for h in halves]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "num_samples": len(targets), "class_counts": counts,
                               "halves": [list(h) for h in halves]}))
    tmp.replace(path)


def load_authors_partition(path: str | Path, num_samples: Optional[int] = None) -> tuple[list[int], list[int]]:
    """The authors' setup-B partition file (``usr_group_<kl>.npy``: one row per partition, the partition id
    then its indices as floats; their data module reads ``{row[0]: row[1:]}``). Partition 0 is half 1
    (pretraining), partition 1 half 2 (fine-tuning). Indices are returned in the file's order, which
    their train/val split uses (the first 80% train)."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise ValueError(f"partition file {path}: expected the authors' format, 2 rows (partition id, indices...), "
                         f"got an array of shape {arr.shape}")
    rows = {int(r[0]): r[1:] for r in arr}
    if sorted(rows) != [0, 1]:
        raise ValueError(f"partition file {path}: partition ids {sorted(rows)}, expected 0 and 1")
    halves = []
    for pid in (0, 1):
        idx = rows[pid]
        if not np.all(idx == np.round(idx)):
            raise ValueError(f"partition file {path}: partition {pid} holds non-integer indices")
        idx = idx.astype(np.int64)
        if num_samples is not None and (idx.min() < 0 or idx.max() >= num_samples):
            raise ValueError(f"partition file {path}: indices outside [0, {num_samples}) of this dataset's training "
                             f"pool; is it the file of another dataset?")
        halves.append(idx.tolist())
    if len(set(halves[0]) | set(halves[1])) != len(halves[0]) + len(halves[1]):
        raise ValueError(f"partition file {path}: an index is repeated within or across the two partitions")
    return halves[0], halves[1]


def find_authors_partition(dataset_dir: Path) -> Optional[Path]:
    """``<dataset_dir>/usr_group_*.npy`` when exactly one is there (where the authors keep theirs), else None."""
    found = sorted(Path(dataset_dir).glob("usr_group_*.npy"))
    return found[0] if len(found) == 1 else None


def load_partition(path: str | Path, num_samples: Optional[int] = None) -> tuple[list[int], list[int]]:
    """A partition JSON of this project, or the authors' ``.npy`` (:func:`load_authors_partition`)."""
    if str(path).endswith(".npy"):
        return load_authors_partition(path, num_samples)
    d = json.loads(Path(path).read_text())
    if num_samples is not None and d["num_samples"] != num_samples:
        raise ValueError(f"partition {path} was made for {d['num_samples']} samples, the dataset has {num_samples}")
    return list(d["halves"][0]), list(d["halves"][1])


def train_val_split(indices: Sequence[int], val_fraction: float, seed: int,
                    in_order: bool = False) -> tuple[list[int], list[int]]:
    """Seeded shuffle of ``indices``, the first ``val_fraction`` of them for validation. ``in_order``: the
    authors' setup-B split instead, the first int((1 - val_fraction) * n) indices as given for training."""
    if in_order:
        n_train = int((1.0 - val_fraction) * len(indices))
        return list(indices[:n_train]), list(indices[n_train:])
    perm = np.random.default_rng(seed).permutation(len(indices))
    n_val = int(round(len(indices) * val_fraction))
    idx = np.asarray(indices)[perm]
    return sorted(idx[n_val:].tolist()), sorted(idx[:n_val].tolist())


MIN_RESOLUTION = 8  # the digits' own size; below it an image has fewer pixels than the smallest dataset


def check_data_options(batch_size: int = 64, resolution: int = 224, val_fraction: float = 0.2, num_workers: int = 0,
                       num_shards: int = 20, mean=None, std=None, **_) -> None:
    """ValueError naming the option, the value and the valid range, before any data is loaded."""
    def isint(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def bad(option, value, valid):
        raise ValueError(f"--data.{option} {value!r} is invalid: {valid}")

    if not isint(batch_size) or batch_size < 1:
        bad("batch_size", batch_size, "it must be an integer >= 1 (samples per process and step)")
    if not isint(resolution) or resolution < MIN_RESOLUTION:
        bad("resolution", resolution, f"it must be an integer >= {MIN_RESOLUTION} (square input side in pixels)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (0 <= val_fraction < 1):
        bad("val_fraction", val_fraction, "it must be in [0, 1): the train split needs samples (0 validates on the "
                                          "dataset's official test split, e.g. BoolQ's dev set)")
    if not isint(num_workers) or num_workers < 0:
        bad("num_workers", num_workers, "it must be an integer >= 0")
    if not isint(num_shards) or num_shards < 2 or num_shards % 2:
        bad("num_shards", num_shards, "it must be an even integer >= 2")
    for option, value, low in (("mean", mean, -math.inf), ("std", std, 0.0)):
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                for v in value)):
            bad(option, value, "it must be three finite numbers, one per RGB channel, for inputs in [0, 1]"
                + (", each > 0" if option == "std" else "") + " (e.g. [0.5, 0.5, 0.5])")
    if (mean is None) != (std is None):
        raise ValueError("--data.mean and --data.std go together: give both (or neither: the model's own, else "
                         "ImageNet's)")


class EpochSampler(torch.utils.data.RandomSampler):
    """A random order drawn from ``(seed, epoch)`` alone: Lightning calls ``set_epoch`` at each epoch start, so a run
    resumed at an epoch boundary sees exactly the batches an uninterrupted run sees (a plain RandomSampler draws from
    the global RNG, whose state a checkpoint does not keep). Each index comes with its sample's seed,
    ``(index, seed)``, which :class:`SeededSamples` draws the sample's augmentation from, so that what a sample
    looks like depends on (seed, epoch, index) only, not on the order, the process or what ran before.
    ``skip(n)``: the next pass leaves out the first ``n`` samples of its order (a run resumed mid-epoch continues
    where it stopped: callbacks.ExactResume)."""

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch, self._skip = int(seed), 0, None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)

    def skip(self, n: int, epoch: int) -> None:
        """The next pass over ``epoch`` (only that epoch's: a skip never reaches another) starts after its first
        ``n`` samples."""
        self._skip = (int(epoch), int(n))

    def __iter__(self):
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip, self._skip = self._skip[1], None
        base = (self.seed * 1_000_003 + self.epoch) * (2 ** 31 - 1)  # > any dataset's length: no seed repeats
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield index, (base + index) % 2 ** 63


class SeededSamples(Dataset):
    """``dataset[index]`` computed with torch's, Python's and NumPy's global RNGs seeded from the sample's own seed
    (keys ``(index, seed)`` from :class:`EpochSampler`; a plain index is passed through) and put back afterwards:
    random augmentations draw the same numbers whatever ran before, in the main process or a worker, and draw
    nothing from the training's own random state (dropout keeps its sequence)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # the wrapped dataset's attributes (targets, classes ...), never its protocols
        if name == "dataset" or name.startswith("__"):  # (a forwarded __getitems__ would get (index, seed) keys)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only (manual_seed reseeds CUDA's too)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class TransformSubset(Dataset):
    """A subset of a base dataset with its own image transform (train and val share one pool)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform=None):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.base[self.indices[i]]
        return (self.transform(x) if self.transform else x), y


AUGMENT_CHOICES = ("standard", "paper")


def image_transforms(resolution: int, train: bool, augment: str = "standard", dataset: str = "",
                     setup: str = "A", stats: Optional[tuple] = None):
    """``standard`` (ours): random-resized crop + flip for training, resize + centre crop for evaluation,
    ImageNet statistics. ``paper``: what the authors' data modules do: pets, cub200, flowers102 and CIFAR are only
    resized to resolution x resolution (no augmentation, train and eval alike), CIFAR normalised with mean = std =
    0.5; ImageNet is random-resized crop + flip on the training split *and*, in setup A, on the evaluation split
    (setup B evaluates with resize + centre crop, as ours). ``stats``: (mean, std) replacing the normalisation of
    either (``--data.mean``/``--data.std``; a timm/pretrainedmodels backbone's own)."""
    import torchvision.transforms as T

    if augment not in AUGMENT_CHOICES:
        raise ValueError(f"--data.augment {augment!r}: choose one of {', '.join(AUGMENT_CHOICES)}")
    spec = _registered().get(dataset)
    if augment == "paper" and not (spec is not None and spec.paper_random_crop):
        if stats is None:
            stats = spec.paper_stats if spec is not None and spec.paper_stats is not None else (IMAGENET_MEAN,
                                                                                                 IMAGENET_STD)
        return T.Compose([T.ToTensor(), T.Resize((resolution, resolution)), T.Normalize(*stats)])
    norm = [T.ToTensor(), T.Normalize(*(stats or (IMAGENET_MEAN, IMAGENET_STD)))]
    if train or (augment == "paper" and setup == "A"):
        return T.Compose([T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(int(round(resolution / 0.875))), T.CenterCrop(resolution), *norm])


# ----------------------------------------------------------------------------- data module
class ClassificationData(pl.LightningDataModule):
    def __init__(
        self,
        name: str = "digits",
        root: str = "data",
        setup: Literal["A", "B"] = "A",
        half: Literal[1, 2] = 2,
        partition_file: Optional[str] = None,
        num_shards: int = 20,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 64,
        resolution: int = 224,
        num_workers: int = 4,
        download: bool = False,
        augment: Literal["standard", "paper"] = "standard",
        max_length: int = 512,
        tokenizer: Optional[str] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
    ):
        """Image classification data.

        Args:
            name: Dataset: digits, cifar10, cifar100, flowers102, pets, cub200 or imagenet; segmentation (with a
                segmentation model): voc12aug, cityscapes or digit_scenes (segmentation/data.py).
            root: Folder holding one sub-folder per dataset (``<root>/<name>/``).
            setup: "A": the whole training pool (ImageNet-pretrained backbone, downstream set).
                "B": the pool is split into two label-skewed halves (pretrain on half 1, fine-tune on half 2).
            half: Setup B only: which half to train and validate on (1 = pretraining, 2 = fine-tuning).
            partition_file: Setup B only: reload this partition instead of recomputing it: a partition.json of an
                earlier run, or the authors' ``usr_group_<kl>.npy`` (partition 0 = half 1, partition 1 = half 2;
                train/val split as theirs: the first 80% of the file's order). "auto": the one
                ``<root>/<name>/usr_group_*.npy`` when present (the paper's CIFAR splits), else computed.
            num_shards: Setup B only: number of label-sorted shards dealt to the two halves (fewer = more skew).
            val_fraction: Fraction of the chosen pool held out for validation (paper: 80/20).
            split_seed: Seed of the setup-B partition and of the train/val split.
            batch_size: Mini-batch size per process.
            resolution: Square input resolution in pixels.
            num_workers: DataLoader worker processes.
            download: Let torchvision download the dataset when it is missing (needs internet).
            augment: "standard" (ours: random-resized crop + flip to train, resize + centre crop to evaluate) or
                "paper" (the authors' preprocessing: resize only for the downstream sets, CIFAR normalised with 0.5,
                ImageNet setup A randomly cropped for evaluation too). No effect on digits and text datasets.
            max_length: Text datasets (boolq): tokens per sample, truncated / padded to it (paper: 512).
            tokenizer: Text datasets (boolq): a model directory, a tokenizer.json or a hub name; default: the LLM
                backbone's own (--model.backbone tinyllama or --model.name_or_path).
            mean: Per-channel (RGB) mean the images are normalised with, for inputs in [0, 1]; with ``std``.
                Default: the backbone's own for timm:/pretrainedmodels: models (their pretrained configuration),
                else ImageNet's (CIFAR's 0.5 with --data.augment paper).
            std: Per-channel (RGB) standard deviation, with ``mean``.
        """
        super().__init__()
        check_data_options(batch_size, resolution, val_fraction, num_workers, num_shards, mean, std)
        self.save_hyperparameters()  # into checkpoints: a resume is checked against the data it was trained on
        self.spec = get_dataset_spec(name)
        if self.spec.kind == "text" and resolution != 224:
            warnings.warn(f"--data.resolution {resolution} does nothing for the text dataset {name!r} (its sequences "
                          f"are --data.max_length tokens); it still enters the run's name and settings, so that runs "
                          f"made with it keep their directories. Leave it out for token data", stacklevel=2)
        self.name, self.root, self.setup_name, self.half = name, Path(root), setup, half
        self.partition_file, self.num_shards = partition_file, num_shards
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.batch_size, self.resolution, self.num_workers, self.download = batch_size, resolution, num_workers, download
        if augment not in AUGMENT_CHOICES:
            raise ValueError(f"--data.augment {augment!r}: choose one of {', '.join(AUGMENT_CHOICES)}")
        self.augment = augment
        self.max_length, self.tokenizer = max_length, tokenizer
        self.stats = (tuple(mean), tuple(std)) if mean is not None else None
        if self.stats is not None and self.spec.in_memory:
            warnings.warn(f"--data.mean/--data.std do nothing for {name!r}: it is built in memory as ready tensors "
                          f"(no image transforms)", stacklevel=2)
        self.run_dir: Optional[Path] = None  # set by the CLI; setup B writes partition.json there
        self.resume_position: Optional[tuple[int, int]] = None  # (epoch, batches done): callbacks.ExactResume
        self.partition: Optional[tuple[list[int], list[int]]] = None
        self.partition_source: Optional[str] = None
        self._built = False

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name

    def _build_pool(self):
        try:
            return self.spec.build(self.dataset_dir, self.download, resolution=self.resolution,
                                   tokenizer=self.tokenizer, max_length=self.max_length)
        except (RuntimeError, FileNotFoundError) as err:
            if self.spec.kind == "text" and "tokenizer" in str(err):
                raise
            raise FileNotFoundError(
                f"Dataset {self.name!r} not found under {self.dataset_dir} ({err}).\n"
                f"How to obtain it: {self.spec.how_to_obtain}.\n"
                f"Put it under --data.root (now {self.root!s}) or point --data.root elsewhere."
            ) from err

    def prepare_data(self):
        if self.download and self.spec.downloadable:
            self._build_pool()  # downloads once, on one process per node

    def setup(self, stage: Optional[str] = None):
        if self._built:
            return
        if self.spec.make_sets is not None:  # segmentation: the dataset's own train/val split and pipeline
            self.train_set, self.val_set, self.test_set = self.spec.make_sets(self.root, self.resolution,
                                                                              self.split_seed)
            self._built = True
            return
        pool, test = self._build_pool()
        targets = dataset_targets(pool)
        indices = list(range(len(pool)))
        if self.setup_name == "B":
            source = self.partition_file
            if source == "auto":
                found = find_authors_partition(self.dataset_dir)
                source = str(found) if found is not None else None
            self.partition_source = source
            if source:
                halves = load_partition(source, len(pool))
            else:
                halves = label_skewed_halves(targets, self.num_shards, self.split_seed)
            self.partition = halves
            if self.run_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
                save_partition(Path(self.run_dir) / "partition.json", halves, targets,
                               dict(dataset=self.name, num_shards=self.num_shards, seed=self.split_seed,
                                    source=str(source or "computed")))
            indices = halves[self.half - 1]
        authors_file = self.setup_name == "B" and str(self.partition_source or "").endswith(".npy")
        train_idx, val_idx = train_val_split(indices, self.val_fraction, self.split_seed, in_order=authors_file)
        if self.val_fraction == 0 and test is None:
            raise ValueError(f"--data.val_fraction 0 validates on the official test split, and {self.name!r} has "
                             f"none: choose a fraction in (0, 1)")
        if not train_idx or (not val_idx and self.val_fraction > 0):
            raise ValueError(f"--data.val_fraction {self.val_fraction} leaves {len(train_idx)} training and "
                             f"{len(val_idx)} validation samples of {len(indices)}: choose a fraction that leaves "
                             f"samples in both")
        is_tensor = self.spec.in_memory
        t_train = None if is_tensor else image_transforms(self.resolution, True, self.augment, self.name,
                                                          self.setup_name, self.stats)
        t_eval = None if is_tensor else image_transforms(self.resolution, False, self.augment, self.name,
                                                         self.setup_name, self.stats)
        self.train_set = TransformSubset(pool, train_idx, t_train)
        self.val_set = TransformSubset(pool, val_idx, t_eval)
        self.test_set = TransformSubset(test, range(len(test)), t_eval) if test is not None else self.val_set
        if not val_idx and test is not None:  # --data.val_fraction 0: validate on the official test split (BoolQ dev)
            self.val_set = self.test_set
        self._built = True

    def _loader(self, ds, shuffle: bool):
        batch_size = self.batch_size if shuffle or self.spec.eval_batch_size is None else self.spec.eval_batch_size
        seed = torch.initial_seed() % 2**31  # seed_everything's seed
        sampler = EpochSampler(ds, seed) if shuffle else None
        if sampler is not None and self.resume_position is not None:
            # a resumed fit (callbacks.ExactResume): the epoch it resumes in and the batches of it already trained,
            # set before Lightning makes the loader's iterator (its workers prefetch at once)
            epoch, done = self.resume_position
            self.resume_position = None
            sampler.set_epoch(epoch)
            if done:
                sampler.skip(done * batch_size, epoch)
        # training: each sample's augmentation from its own seed, the workers' seeds from the loader's own generator:
        # loading data draws nothing from the global RNG (exact resume at any step: callbacks.ExactResume)
        return DataLoader(SeededSamples(ds) if shuffle else ds, batch_size=batch_size, sampler=sampler,
                          shuffle=False if shuffle else None, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(seed),
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                          drop_last=False)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)
