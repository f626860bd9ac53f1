"""DataModules: IDX parsing, clear errors for missing files, digits split."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

import dynprune as dp
from dynprune.data import read_idx


def test_read_idx_roundtrip(tmp_path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", 2, 3, 4) + arr.tobytes())
    assert np.array_equal(read_idx(path), arr)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(bad)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path) -> None:
    dm = dp.FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")


def test_missing_cifar_names_the_expected_layout(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-python.tar.gz"):
        dp.CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b = dp.DigitsDataModule(seed=1), dp.DigitsDataModule(seed=1)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    assert (a.train_set.tensors[0] == b.train_set.tensors[0]).all()
    x, y = next(iter(a.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and y.dtype.is_floating_point is False


@pytest.mark.skipif(not dp.data.Path(dp.data.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_from_debian_package() -> None:
    dm = dp.FashionMNISTDataModule(train_subset=1000, test_subset=500)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and abs(float(x.mean())) < 0.3 and int(y.max()) <= 9
    assert len(dm.test_set) == 500
