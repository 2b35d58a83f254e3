"""Segmentation datasets and the authors' MMSegmentation pipeline, registered in ``classification.registry.DATASETS``.

* ``voc12aug``: Pascal VOC 2012 + SBD ("augmented", 10,582 training images, 1,449 val), 21 classes, read from
  ``<root>/voc12aug/`` laid out as mmseg's VOC2012 folder after ``tools/convert_datasets/voc_aug.py``::

      JPEGImages/*.jpg  SegmentationClass/*.png  SegmentationClassAug/*.png
      ImageSets/Segmentation/{train.txt, aug.txt, val.txt}

  training = train.txt (labels in SegmentationClass) + aug.txt (SegmentationClassAug), as mmseg's
  ``pascal_voc12_aug.py``; validation = val.txt. docs/segmentation.md ("Data") says how to build it.
* ``cityscapes``: 19 classes, ``<root>/cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (mmseg's ``convert_datasets/cityscapes.py``).
* ``digit_scenes``: a real bundled dataset for tests and the CPU demo: scenes composed from scikit-learn's
  handwritten digits (1,797 real 8x8 scans), each digit pasted at a random place and scale on a dark canvas,
  per-pixel labels = digit + 1 where the digit's stroke is, 0 (background) elsewhere: 11 classes.

Training pipeline (mmseg ``pascal_voc12.py``, which the authors inherit): random rescale of the (2048, 512)
scale by a ratio in [0.5, 2.0] keeping the aspect ratio, random crop ``resolution`` x ``resolution`` whose most
frequent class covers < 75 % (10 tries), horizontal flip p=0.5, photometric distortion, ImageNet mean/std
normalisation, padding to the crop size (image 0, label 255). Evaluation: rescale to (2048, 512) keeping the
ratio; the label stays at its original size (the model's logits are resized to it, as mmseg's whole-image
inference does). Cityscapes uses its (2048, 1024) scale and 512 x 1024 crops (set --data.resolution 512 for the
short side).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from classification.registry import register_dataset

from .metrics import IGNORE_INDEX

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


# ----------------------------------------------------------------------------- pipeline
def _rescale_size(w: int, h: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv.rescale_size with keep_ratio: the largest factor fitting long edge <= max(scale), short <= min."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def _resize(img, seg, size):
    from PIL import Image

    return img.resize(size, Image.BILINEAR), (seg.resize(size, Image.NEAREST) if seg is not None else None)


def _photometric(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness +-32, contrast x[0.5,1.5] (before or after), saturation
    x[0.5,1.5] and hue +-18 (OpenCV units of 2 degrees) in HSV; each with probability 1/2. PIL's 8-bit HSV."""
    from PIL import Image

    img = img.astype(np.float32)
    clip = lambda a: np.clip(a, 0, 255)  # noqa: E731
    if rng.random() < 0.5:
        img = clip(img + rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = clip(img * rng.uniform(0.5, 1.5))
    sat, hue = rng.random() < 0.5, rng.random() < 0.5
    if sat or hue:
        hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if sat:
            hsv[..., 1] = clip(hsv[..., 1] * rng.uniform(0.5, 1.5))
        if hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 180) % 256
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        img = clip(img * rng.uniform(0.5, 1.5))
    return img


def _random_crop(img: np.ndarray, seg: np.ndarray, size: tuple[int, int], rng: random.Random,
                 cat_max_ratio: float = 0.75):
    ch, cw = min(size[0], img.shape[0]), min(size[1], img.shape[1])

    def crop_at():
        y = rng.randint(0, img.shape[0] - ch)
        x = rng.randint(0, img.shape[1] - cw)
        return y, x

    y, x = crop_at()
    for _ in range(10):  # mmseg RandomCrop: retry while one class covers >= cat_max_ratio of the crop
        labels, counts = np.unique(seg[y:y + ch, x:x + cw], return_counts=True)
        counts = counts[labels != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y, x = crop_at()
    return img[y:y + ch, x:x + cw], seg[y:y + ch, x:x + cw]


def _to_tensors(img: np.ndarray, seg: np.ndarray, pad_to: Optional[tuple[int, int]] = None):
    x = torch.from_numpy(((img.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())
    y = torch.from_numpy(seg.astype(np.int64))
    if pad_to is not None and tuple(x.shape[1:]) != tuple(pad_to):
        ph, pw = pad_to[0] - x.shape[1], pad_to[1] - x.shape[2]
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
        y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x, y


class SegmentationFiles(Dataset):
    """(image path, label path) pairs through the mmseg pipeline (``train``) or its evaluation resize."""

    def __init__(self, pairs: list[tuple[Path, Path]], train: bool, scale: tuple[int, int], crop: tuple[int, int],
                 num_classes: Optional[int] = None):
        self.pairs, self.train, self.scale, self.crop = pairs, train, scale, crop
        self.num_classes = num_classes  # labels must be < num_classes or IGNORE_INDEX (None: not checked)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        from PIL import Image

        img_path, seg_path = self.pairs[i]
        img, seg = Image.open(img_path).convert("RGB"), Image.open(seg_path)
        check_label(seg, img.size, seg_path, img_path, self.num_classes)
        if not self.train:
            img, _ = _resize(img, None, _rescale_size(*img.size, self.scale))
            return _to_tensors(np.asarray(img), np.asarray(seg))
        rng = random.Random(random.random())  # python's random is seeded per DataLoader worker (and by seed_everything)
        ratio = rng.uniform(0.5, 2.0)
        img, seg = _resize(img, seg, _rescale_size(*img.size, (self.scale[0] * ratio, self.scale[1] * ratio)))
        img, seg = _random_crop(np.asarray(img), np.asarray(seg), self.crop, rng)
        if rng.random() < 0.5:
            img, seg = img[:, ::-1], seg[:, ::-1]
        img = _photometric(img, rng)
        return _to_tensors(img, seg, pad_to=self.crop)


def check_label(seg, image_size: tuple[int, int], seg_path: Path, img_path: Path, num_classes: Optional[int]) -> None:
    """A label map is one class index per pixel (a palette or grayscale PNG), of its image's size, each value a
    class or IGNORE_INDEX: ValueError naming the file and what it holds otherwise (an RGB colour map, another size,
    a class the dataset does not have would train or score silently wrong)."""
    if seg.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"label {seg_path} is a {seg.mode} image; expected one class index per pixel (a palette or "
                         f"grayscale PNG, as mmseg's convert_datasets scripts write): convert the colour map first")
    if seg.size != image_size:
        raise ValueError(f"label {seg_path} is {seg.size[0]}x{seg.size[1]} but its image {img_path} is "
                         f"{image_size[0]}x{image_size[1]}; a label must cover its image pixel for pixel")
    if num_classes is not None:
        values = np.unique(np.asarray(seg))
        bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
        if bad:
            raise ValueError(f"label {seg_path} holds class value(s) {bad[:8]}; this dataset has classes 0-"
                             f"{num_classes - 1} and {IGNORE_INDEX} (ignored)")


# ----------------------------------------------------------------------------- VOC12 aug
VOC_HOW_TO = (
    "Pascal VOC 2012 augmented with SBD, in mmseg's layout under <root>/voc12aug/: JPEGImages/, SegmentationClass/, "
    "SegmentationClassAug/ and ImageSets/Segmentation/{train,aug,val}.txt. Build it as the authors' README does: "
    "download VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and SBD's benchmark.tgz "
    "(https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz), run "
    "mmsegmentation's tools/convert_datasets/voc_aug.py VOCdevkit VOCdevkit/VOCaug (it writes SegmentationClassAug/ "
    "and aug.txt), then link VOCdevkit/VOC2012 to <root>/voc12aug (docs/segmentation.md, 'Data')")


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _require(paths: list[Path], name: str, how: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: missing {', '.join(missing)}.\nHow to obtain it: {how}")


def voc12aug_sets(root: Path, resolution: int, seed: int = 0):
    d = Path(root) / "voc12aug"
    lists = d / "ImageSets" / "Segmentation"
    _require([d / "JPEGImages", d / "SegmentationClass", d / "SegmentationClassAug", lists / "train.txt",
              lists / "aug.txt", lists / "val.txt"], "voc12aug", VOC_HOW_TO)
    train = [(d / "JPEGImages" / f"{n}.jpg", d / "SegmentationClass" / f"{n}.png") for n in _read_list(lists / "train.txt")]
    train += [(d / "JPEGImages" / f"{n}.jpg", d / "SegmentationClassAug" / f"{n}.png")
              for n in _read_list(lists / "aug.txt")]
    val = [(d / "JPEGImages" / f"{n}.jpg", d / "SegmentationClass" / f"{n}.png") for n in _read_list(lists / "val.txt")]
    for pairs, files in ((train, "train.txt and aug.txt"), (val, "val.txt")):
        if not pairs:
            raise ValueError(f"dataset 'voc12aug': {lists} / {files} list no images; {VOC_HOW_TO}")
    scale, crop = (4 * resolution, resolution), (resolution, resolution)
    val_set = SegmentationFiles(val, False, scale, crop, num_classes=21)
    return SegmentationFiles(train, True, scale, crop, num_classes=21), val_set, val_set


# ----------------------------------------------------------------------------- Cityscapes
CITYSCAPES_HOW_TO = (
    "Cityscapes (https://www.cityscapes-dataset.com/: leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip) under "
    "<root>/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/, with the *_gtFine_labelTrainIds.png label maps that "
    "mmsegmentation's tools/convert_datasets/cityscapes.py writes")


def cityscapes_sets(root: Path, resolution: int, seed: int = 0):
    d = Path(root) / "cityscapes"
    _require([d / "leftImg8bit" / "train", d / "leftImg8bit" / "val", d / "gtFine" / "train", d / "gtFine" / "val"],
             "cityscapes", CITYSCAPES_HOW_TO)

    def pairs(split):
        out = []
        for img in sorted((d / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            seg = d / "gtFine" / split / img.parent.name / img.name.replace("_leftImg8bit.png",
                                                                             "_gtFine_labelTrainIds.png")
            out.append((img, seg))
        if not out:
            raise FileNotFoundError(f"dataset 'cityscapes': no *_leftImg8bit.png under {d / 'leftImg8bit' / split}."
                                    f"\nHow to obtain it: {CITYSCAPES_HOW_TO}")
        return out

    scale, crop = (4 * resolution, 2 * resolution), (resolution, 2 * resolution)  # mmseg: (2048, 1024), 512x1024
    val_set = SegmentationFiles(pairs("val"), False, scale, crop, num_classes=19)
    return SegmentationFiles(pairs("train"), True, scale, crop, num_classes=19), val_set, val_set


# ----------------------------------------------------------------------------- digit scenes
class DigitScenes(Dataset):
    """``n`` scenes of ``resolution`` x ``resolution`` pixels, each with 2-4 scikit-learn digits (the split's own
    digit images) scaled by 3-6x at random places; label = digit + 1 on stroke pixels (intensity > 0.3), 0
    elsewhere. Deterministic in ``seed``; ``flip`` mirrors half the scenes at random (training)."""

    NUM_CLASSES = 11

    def __init__(self, n: int, resolution: int, digit_indices, seed: int, flip: bool = False):
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = torch.tensor(d.images[list(digit_indices)], dtype=torch.float32) / 16.0
        targets = torch.tensor(d.target[list(digit_indices)])
        g = torch.Generator().manual_seed(seed)
        x = 0.1 * torch.rand(n, resolution, resolution, generator=g)
        y = torch.zeros(n, resolution, resolution, dtype=torch.int64)
        for s in range(n):
            for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
                k = int(torch.randint(0, len(imgs), (1,), generator=g))
                size = min(resolution, 8 * int(torch.randint(3, 7, (1,), generator=g)))
                patch = torch.nn.functional.interpolate(imgs[k][None, None], size=(size, size), mode="bilinear",
                                                        align_corners=False)[0, 0]
                top, left = (int(torch.randint(0, resolution - size + 1, (1,), generator=g)) for _ in range(2))
                region = x[s, top:top + size, left:left + size]
                x[s, top:top + size, left:left + size] = torch.maximum(region, patch)
                y[s, top:top + size, left:left + size][patch > 0.3] = int(targets[k]) + 1
        self.images = ((x - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        self.labels = y
        self.flip = flip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self.images[i], self.labels[i]
        if self.flip and random.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def digit_scenes_sets(root: Path, resolution: int, seed: int = 0, n_train: int = 400, n_val: int = 100):
    """Disjoint digit images for train (first 80 % of scikit-learn's digits) and val (the rest)."""
    split = int(0.8 * 1797)
    train = DigitScenes(n_train, resolution, range(split), seed=seed, flip=True)
    val = DigitScenes(n_val, resolution, range(split, 1797), seed=seed + 1)
    return train, val, val


# ----------------------------------------------------------------------------- registration
register_dataset("voc12aug", num_classes=21, build=None, how_to_obtain=VOC_HOW_TO, task="segmentation",
                 make_sets=voc12aug_sets, eval_batch_size=1)
register_dataset("cityscapes", num_classes=19, build=None, how_to_obtain=CITYSCAPES_HOW_TO, task="segmentation",
                 make_sets=cityscapes_sets, eval_batch_size=1)
register_dataset("digit_scenes", num_classes=DigitScenes.NUM_CLASSES, build=None,
                 how_to_obtain="bundled: composed from scikit-learn's digits; nothing to download", task="segmentation",
                 make_sets=digit_scenes_sets)
