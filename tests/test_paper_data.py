"""The authors' setup-B partition files and preprocessing as options (classification/data.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from classification.data import (ClassificationData, find_authors_partition, image_transforms, load_partition)
from conftest import REPO

AUTHORS = REPO.parent / "shared" / "reference" / "authors_setupB"


@pytest.mark.skipif(not (AUTHORS / "cifar10_usr_group_15.29.npy").is_file(), reason="authors' files not here")
@pytest.mark.parametrize("name", ["cifar10_usr_group_15.29.npy", "cifar100_usr_group_15.82.npy"])
def test_authors_cifar_partition_loads_as_two_disjoint_halves(name):
    h1, h2 = load_partition(AUTHORS / name, num_samples=50_000)
    assert len(h1) == len(set(h1)) == 25_000 and len(h2) == len(set(h2)) == 25_000
    assert not set(h1) & set(h2) and set(h1) | set(h2) == set(range(50_000))
    raw = np.load(AUTHORS / name)
    assert h2[:3] == [int(v) for v in raw[1, 1:4]]  # partition 1 = half 2, in the file's order
    with pytest.raises(ValueError, match="outside"):
        load_partition(AUTHORS / name, num_samples=10_000)


def test_bad_npy_partition_messages(tmp_path):
    np.save(tmp_path / "one_row.npy", np.zeros((1, 5)))
    with pytest.raises(ValueError, match="2 rows"):
        load_partition(tmp_path / "one_row.npy")
    np.save(tmp_path / "dup.npy", np.array([[0, 1, 2], [1, 2, 3]], dtype=float))
    with pytest.raises(ValueError, match="repeated"):
        load_partition(tmp_path / "dup.npy")


def test_auto_uses_the_authors_file_and_their_in_order_split(tmp_path):
    rng = np.random.default_rng(0)
    perm = rng.permutation(1797).astype(float)  # digits has 1,797 images
    (tmp_path / "digits").mkdir()
    np.save(tmp_path / "digits" / "usr_group_1.00.npy", np.stack([np.r_[0, perm[:898]], np.r_[1, perm[898:1796]]]))
    assert find_authors_partition(tmp_path / "digits").name == "usr_group_1.00.npy"
    dm = ClassificationData("digits", root=str(tmp_path), setup="B", half=2, partition_file="auto", resolution=8)
    dm.setup()
    half2 = [int(v) for v in perm[898:1796]]
    assert dm.train_set.indices == half2[:int(0.8 * 898)] and dm.val_set.indices == half2[int(0.8 * 898):]
    computed = ClassificationData("digits", root=str(tmp_path / "none"), setup="B", partition_file="auto",
                                  resolution=8)
    computed.setup()  # no file there: our label-skewed halves
    assert computed.partition_source is None and len(computed.train_set) + len(computed.val_set) < 1797


def test_paper_preprocessing():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    cifar = image_transforms(24, True, "paper", "cifar10")
    a, b = cifar(img), cifar(img)
    assert a.shape == (3, 24, 24) and torch.equal(a, b)  # resize only: deterministic, squashed to 24 x 24
    raw = torch.from_numpy(np.array(img.resize((24, 24), Image.BILINEAR))).permute(2, 0, 1) / 255
    assert (a * 0.5 + 0.5 - raw).abs().mean() < 0.02  # mean = std = 0.5
    pets = image_transforms(24, False, "paper", "pets")
    assert "Normalize(mean=(0.485" in repr(pets) and "Random" not in repr(pets)
    assert "RandomResizedCrop" in repr(image_transforms(24, False, "paper", "imagenet", "A"))  # their eval split
    assert "CenterCrop" in repr(image_transforms(24, False, "paper", "imagenet", "B"))
    assert "CenterCrop" in repr(image_transforms(24, False, "standard", "cifar10"))
    with pytest.raises(ValueError, match="paper"):
        ClassificationData("digits", augment="authors")
