"""DataModules: IDX parsing, clear errors for missing, damaged and inconsistent files, digits split, CIFAR
batches that cannot run code."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_rounding

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


# -- untrusted and damaged data files ------------------------------------------------------------

def _idx(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` (uint8) as a gzipped IDX file."""
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())
    return path


def _fmnist(root: Path, n_images: int = 6, n_labels: int = 6, top_label: int = 9) -> Path:
    rng = np.random.default_rng(0)
    for images, labels in dp.FashionMNISTDataModule.FILES.values():
        _idx(root / images, rng.integers(0, 256, (n_images, 28, 28)))
        _idx(root / labels, np.append(np.arange(n_labels - 1) % 10, top_label))
    return root


def test_truncated_gz_names_the_file(tmp_path: Path) -> None:
    path = _idx(tmp_path / "x-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt"):
        read_idx(path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_labels": 5}, r"train-images-idx3-ubyte.gz holds images of shape \(6, 28, 28\) but "
                      r".*train-labels-idx1-ubyte.gz holds labels of shape \(5,\)"),
    ({"top_label": 12}, r"train-labels-idx1-ubyte.gz: labels span \[0, 12\] but the data module declares "
                        r"num_classes=10"),
])
def test_inconsistent_fashion_mnist_files_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    dm = dp.FashionMNISTDataModule(data_dir=str(_fmnist(tmp_path, **kwargs)), val_size=1)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_subset": -1}, r"train_subset must be >= 0 \(0 = all images\), got -1"),
    ({"test_subset": -5}, r"test_subset must be >= 0 \(0 = all images\), got -5"),
    ({"val_size": -1}, r"val_size must be >= 0 \(0 = none\), got -1"),
])
def test_negative_sizes_are_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dp.FashionMNISTDataModule(**kwargs)


def test_sizes_beyond_the_data_are_errors_not_clamped(tmp_path: Path) -> None:
    root = str(_fmnist(tmp_path, n_images=10, n_labels=10))
    with pytest.raises(ValueError, match=r"val_size=10 would hold out all 10 training images \(train_subset=0\); "
                                         r"use at most 2"):
        dp.FashionMNISTDataModule(data_dir=root, val_size=10).setup("fit")
    with pytest.raises(ValueError, match=r"train_subset=11 but .*train-images-idx3-ubyte.gz holds 10 images"):
        dp.FashionMNISTDataModule(data_dir=root, train_subset=11).setup("fit")
    dm = dp.FashionMNISTDataModule(data_dir=root, val_size=9)  # within the data: at most a fifth, as documented
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2)


def _cifar(root: Path, labels: list[int] | None = None) -> Path:
    """Five 4-image CIFAR python batches and a test batch, pickled like Python 3 pickles them."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": labels or [0, 3, 9, 1],
                 b"batch_label": b"x"}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.numerics
def test_cifar_batches_load_with_the_restricted_unpickler(tmp_path: Path) -> None:
    dm = dp.CIFAR10DataModule(data_dir=str(_cifar(tmp_path)), val_size=4)
    dm.setup()
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4 and len(dm.test_set) == 4
    x, y = dm.test_set.tensors
    raw = pickle.loads((tmp_path / "test_batch").read_bytes(), encoding="bytes")[b"data"].reshape(4, 3, 32, 32)
    expected = (torch.from_numpy(raw).float() / 255 - torch.tensor(dm.MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(dm.STD).view(1, 3, 1, 1)
    assert_close_rounding(x, expected, depth=3)  # scale, shift, divide
    assert y.tolist() == [0, 3, 9, 1]


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    _cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=rf"{path} is not a CIFAR-10 python batch: refusing to load "
                                         r"'posix.system'"):
        dp.CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_cifar_labels_out_of_range_name_the_file(tmp_path: Path) -> None:
    _cifar(tmp_path, labels=[0, 1, 2, 10])
    with pytest.raises(ValueError, match=rf"{tmp_path}/data_batch_1: labels span \[0, 10\]"):
        dp.CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")
