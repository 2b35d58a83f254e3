"""Data: digits, the fixed 80/20 split, and the setup-B label-skewed partition (file round trip)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from classification.data import (ClassificationData, DigitsDataset, label_skewed_halves, load_partition,
                                 train_val_split)


def label_distribution(targets, idx, num_classes=10):
    counts = np.bincount(np.asarray(targets)[idx], minlength=num_classes)
    return counts / counts.sum()


def test_digits_are_real_rgb_images_at_the_requested_resolution():
    ds = DigitsDataset(resolution=24)
    x, y = ds[0]
    assert len(ds) == 1797 and x.shape == (3, 24, 24) and y == 0
    assert torch.equal(x[0], x[1]) and -1.0 <= x.min() < x.max() <= 1.0
    assert sorted(set(ds.targets)) == list(range(10))


def test_train_val_split_is_80_20_disjoint_and_fixed():
    tr, va = train_val_split(range(1000), 0.2, seed=0)
    assert len(va) == 200 and len(tr) == 800 and not set(tr) & set(va) and set(tr) | set(va) == set(range(1000))
    assert (tr, va) == train_val_split(range(1000), 0.2, seed=0)
    assert va != train_val_split(range(1000), 0.2, seed=1)[1]


def test_setup_b_halves_are_label_skewed_disjoint_and_complete():
    targets = DigitsDataset(resolution=8).targets
    h1, h2 = label_skewed_halves(targets, num_shards=20, seed=0)
    assert not set(h1) & set(h2) and set(h1) | set(h2) == set(range(len(targets)))
    assert abs(len(h1) - len(h2)) <= 10
    # total-variation distance between the halves' label distributions: large for the shards,
    # near 0 for an IID split of the same sizes
    tv = 0.5 * np.abs(label_distribution(targets, h1) - label_distribution(targets, h2)).sum()
    perm = np.random.default_rng(0).permutation(len(targets))
    iid = 0.5 * np.abs(label_distribution(targets, perm[:len(h1)]) - label_distribution(targets, perm[len(h1):])).sum()
    assert tv > 0.3 > 0.1 > iid
    # fewer shards, stronger skew; deterministic in the seed
    h1_4, h2_4 = label_skewed_halves(targets, num_shards=4, seed=0)
    tv4 = 0.5 * np.abs(label_distribution(targets, h1_4) - label_distribution(targets, h2_4)).sum()
    assert tv4 > tv
    assert label_skewed_halves(targets, 20, seed=0) == (h1, h2) != label_skewed_halves(targets, 20, seed=1)
    with pytest.raises(ValueError, match="even"):
        label_skewed_halves(targets, num_shards=3)


def test_partition_file_is_written_and_reloads_identically(tmp_path):
    dm = ClassificationData("digits", setup="B", half=1, resolution=8, num_shards=10, split_seed=3)
    dm.run_dir = tmp_path / "a"
    dm.setup("fit")
    written = json.loads((tmp_path / "a" / "partition.json").read_text())
    assert written["halves"] == [list(h) for h in dm.partition]
    assert [sum(c) for c in written["class_counts"]] == [len(h) for h in dm.partition]
    # half 1 is what this run trains and validates on, split 80/20
    assert set(dm.train_set.indices) | set(dm.val_set.indices) == set(dm.partition[0])
    assert len(dm.val_set) == round(0.2 * len(dm.partition[0]))

    # a run with another seed, told to reload the file, uses exactly that partition
    other = ClassificationData("digits", setup="B", half=2, resolution=8, split_seed=99,
                               partition_file=str(tmp_path / "a" / "partition.json"))
    other.run_dir = tmp_path / "b"
    other.setup("fit")
    assert other.partition == dm.partition
    assert json.loads((tmp_path / "b" / "partition.json").read_text())["halves"] == written["halves"]
    assert set(other.train_set.indices) | set(other.val_set.indices) == set(dm.partition[1])
    with pytest.raises(ValueError, match="1797"):
        load_partition(tmp_path / "a" / "partition.json", num_samples=50)


def test_setup_a_uses_the_whole_pool_and_test_falls_back_to_val():
    dm = ClassificationData("digits", setup="A", resolution=8, batch_size=7)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797 and dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (7, 3, 8, 8) and y.dtype == torch.int64


def test_image_folder_datasets_load_real_image_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in [("train", 10), ("test", 4)]:
        for cls in ["001.Black_footed_Albatross", "002.Laysan_Albatross"]:
            (tmp_path / "cub200" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
                    tmp_path / "cub200" / split / cls / f"{i}.jpg")
    dm = ClassificationData("cub200", root=str(tmp_path), resolution=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    # setup B partitions the ImageFolder pool by its labels without opening the images
    b = ClassificationData("cub200", root=str(tmp_path), setup="B", half=1, num_shards=2, resolution=16)
    b.setup("fit")
    assert sorted(b.partition[0] + b.partition[1]) == list(range(20))
