"""LightningDataModules: Fashion-MNIST from the Debian package (offline default), sklearn digits for
tests, and optional CIFAR-10 / ImageFolder that need the user's own files."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_VAL_SIZE = 5000  # Fashion-MNIST's validation hold-out when val_size is None (at most a fifth)
FASHION_MNIST_HINT = "install it with `apt-get install dataset-fashion-mnist` or set data_dir"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape; a truncated or corrupt
    file is a ValueError naming it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); reinstall or re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is cut short")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values (truncated or corrupt)")
    return body.reshape(shape)


def check_labels(y: Tensor, num_classes: int, source: str) -> None:
    """Labels (N,) must lie in [0, num_classes); ``source`` names the file(s) they came from."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{source}: labels span [{int(y.min())}, {int(y.max())}] but the data module declares "
                         f"num_classes={num_classes} (labels 0..{num_classes - 1}); the file is corrupt or of "
                         "another dataset")


def check_num_classes(datamodule: Any, num_classes: int) -> None:
    """The model's ``num_classes`` must equal the data's: fewer crashes the loss, more trains silently wrong."""
    declared = getattr(datamodule, "num_classes", None)
    if declared is not None and declared != num_classes:
        raise ValueError(f"the model has num_classes={num_classes} but the data ({type(datamodule).__name__}) has "
                         f"{declared} classes; set model.num_classes={declared}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers, strings, bytes, numbers and numpy arrays: a data file never runs
    code (a pickle can name any callable, e.g. ``os.system``, and have it called)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only builtin containers, strings, "
                                         "bytes, numbers and numpy arrays are allowed in a data file")
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> images (N, 3, 32, 32) uint8 and labels (N,) int64, loaded with a restricted
    unpickler; anything else than the expected dict of arrays is a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {err}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels', "
                         f"got {keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{path}: expected uint8 data (N, 3072) and N labels, got data {data.dtype} "
                         f"{data.shape} and labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation that is a function of (seed, epoch) only, so a run resumed from a
    checkpoint sees the same order as an uninterrupted one (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def _split(
    x: Tensor, y: Tensor, val_size: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Seeded train/val split of tensors."""
    if not 0 <= val_size < len(x):
        raise ValueError(f"val_size must be in [0, {len(x)}), got {val_size}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class _TensorDataModule(L.LightningDataModule):
    """Shared loaders over in-memory train/val/test datasets; subclasses fill them in ``setup``."""

    num_classes = 10
    in_chans = 1
    input_size = 28

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, ds: Dataset | None, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        sampler = EpochShuffleSampler(len(ds), self.seed) if shuffle else None
        return DataLoader(ds, self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class FashionMNISTDataModule(_TensorDataModule):
    """Fashion-MNIST (1x28x28, 10 classes) from IDX gz files; no downloads are attempted.

    ``train_subset``/``test_subset`` (0 = all) shorten runs for demos and smoke tests: the first that many images
    of a split (more than the split holds is an error). ``val_size`` of the training images are held out for
    validation, at most a fifth of them; None (the default) holds out 5000, or a fifth of a smaller
    ``train_subset``. A ``val_size`` of all the training images or more is an error.
    """

    MEAN, STD = 0.2860, 0.3530
    FILES = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(
        self, data_dir: str = FASHION_MNIST_DIR, batch_size: int = 128, val_size: int | None = None,
        train_subset: int = 0, test_subset: int = 0, num_workers: int = 0, seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        for name, value in (("val_size", val_size), ("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = {'none' if name == 'val_size' else 'all images'}), "
                                 f"got {value}")
        self.data_dir, self.val_size = Path(data_dir), val_size
        self.train_subset, self.test_subset = train_subset, test_subset

    def _load(self, split: str, limit: int) -> tuple[Tensor, Tensor]:
        paths = [self.data_dir / name for name in self.FILES[split]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST file(s) not found: {', '.join(missing)}; {FASHION_MNIST_HINT}"
            )
        images, labels = (read_idx(p) for p in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{paths[0]} holds images of shape {images.shape} but {paths[1]} holds labels of "
                             f"shape {labels.shape}: expected (N, 28, 28) and (N,); a file is truncated or "
                             "from another dataset")
        x = (torch.from_numpy(images.copy()).float().div_(255).sub_(self.MEAN).div_(self.STD))
        x, y = x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        check_labels(y, self.num_classes, str(paths[1]))
        if limit > len(x):
            raise ValueError(f"{split}_subset={limit} but {paths[0]} holds {len(x)} images; use at most {len(x)} "
                             "(0 = all)")
        if limit:
            x, y = x[:limit], y[:limit]
        return x, y

    def setup(self, stage: str | None = None) -> None:
        """Load tensors once; val is a seeded hold-out from the training images."""
        if self.train_set is None and stage in (None, "fit", "validate"):
            x, y = self._load("train", self.train_subset)
            if self.val_size is not None and self.val_size >= len(x):
                raise ValueError(f"val_size={self.val_size} would hold out all {len(x)} training images "
                                 f"(train_subset={self.train_subset}); use at most {len(x) // 5} (a fifth of them)")
            val_size = DEFAULT_VAL_SIZE if self.val_size is None else self.val_size
            self.train_set, self.val_set = _split(x, y, min(val_size, len(x) // 5), self.seed)
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = TensorDataset(*self._load("test", self.test_subset))


class DigitsDataModule(_TensorDataModule):
    """sklearn's 8x8 digits (1797 images) for fast tests; ``input_size`` upsamples (bilinear)."""

    def __init__(
        self, batch_size: int = 64, input_size: int = 8, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.input_size = input_size

    def setup(self, stage: str | None = None) -> None:
        """Seeded 60/20/20 train/val/test split."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - 0.3) / 0.4
        if self.input_size != 8:
            x = torch.nn.functional.interpolate(x, size=self.input_size, mode="bilinear")
        y = torch.tensor(digits.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[perm], y[perm]
        n = len(x)
        a, b = int(0.6 * n), int(0.8 * n)
        self.train_set = TensorDataset(x[:a], y[:a])
        self.val_set = TensorDataset(x[a:b], y[a:b])
        self.test_set = TensorDataset(x[b:], y[b:])


class CIFAR10DataModule(_TensorDataModule):
    """CIFAR-10 from the user's python-pickle batches (``cifar-10-batches-py``); never downloads. The batches
    are read with a restricted unpickler (:func:`load_cifar_batch`): a crafted file cannot run code."""

    in_chans, input_size = 3, 32
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(
        self, data_dir: str = "data/cifar-10-batches-py", batch_size: int = 128,
        val_size: int = 5000, num_workers: int = 0, seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.data_dir, self.val_size = Path(data_dir), val_size

    def _load(self, names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            path = self.data_dir / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"CIFAR-10 batch {path} not found; expected the python version "
                    f"(data_batch_1..5, test_batch) extracted from cifar-10-python.tar.gz into "
                    f"{self.data_dir}"
                )
            x, y = load_cifar_batch(path)
            check_labels(torch.from_numpy(y), self.num_classes, str(path))
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.concatenate(xs)).float() / 255
        mean, std = torch.tensor(self.MEAN).view(1, 3, 1, 1), torch.tensor(self.STD).view(1, 3, 1, 1)
        return (x - mean) / std, torch.from_numpy(np.concatenate(ys))

    def setup(self, stage: str | None = None) -> None:
        """Train/val split of data_batch_1..5; test_batch for test."""
        if self.train_set is None and stage in (None, "fit", "validate"):
            x, y = self._load([f"data_batch_{i}" for i in range(1, 6)])
            self.train_set, self.val_set = _split(x, y, self.val_size, self.seed)
        if self.test_set is None and stage in (None, "test", "predict"):
            self.test_set = TensorDataset(*self._load(["test_batch"]))


class ImageFolderDataModule(_TensorDataModule):
    """A torchvision ImageFolder tree (``root/train/<class>/*.png``, ``root/val/...``); needs the
    ``vision`` extra, imported only when used."""

    def __init__(
        self, root: str, input_size: int = 224, in_chans: int = 3, batch_size: int = 64,
        num_workers: int = 4, seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.root, self.input_size, self.in_chans = Path(root), input_size, in_chans

    def setup(self, stage: str | None = None) -> None:
        """Build datasets from ``root/train`` and ``root/val`` (val doubles as test)."""
        try:
            from torchvision import datasets, transforms
        except Exception as err:  # torchvision is optional and may fail to import
            raise ImportError("ImageFolderDataModule needs torchvision: pip install -e .[vision]") from err
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise FileNotFoundError(f"ImageFolder split {self.root / split} not found")
        tf = transforms.Compose([transforms.Resize(self.input_size), transforms.CenterCrop(self.input_size),
                                 transforms.ToTensor()])
        self.train_set = datasets.ImageFolder(str(self.root / "train"), tf)
        self.val_set = self.test_set = datasets.ImageFolder(str(self.root / "val"), tf)
        self.num_classes = len(self.train_set.classes)
