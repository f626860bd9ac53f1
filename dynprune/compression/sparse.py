"""Relative sparse indexing (Han et al., Fig. 2): each stored entry records how many zeros precede it
since the previous entry, in ``index_bits`` bits; a gap longer than ``2**index_bits - 1`` is bridged
with filler zeros (stored entries whose value is zero)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RelativeIndex:
    """Stored entries of a flattened sparse tensor: zeros skipped before each, and filler flags."""

    skips: np.ndarray
    filler: np.ndarray

    def positions(self) -> np.ndarray:
        """Flat positions of the stored entries (fillers included)."""
        return relative_positions(self.skips)


def relative_encode(mask: np.ndarray, index_bits: int) -> RelativeIndex:
    """Encode the non-zero positions of flat boolean ``mask`` as ``index_bits``-bit relative skips."""
    if not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits must be in [1, 16], got {index_bits}")
    span = 2**index_bits
    pos = np.flatnonzero(np.asarray(mask).reshape(-1))
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // span
    counts = fillers + 1
    owner = np.repeat(np.arange(len(pos)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    last = k == fillers[owner]
    skips = np.where(last, (gaps - fillers * span)[owner], span - 1)
    return RelativeIndex(skips.astype(np.int64), ~last)


def relative_positions(skips: np.ndarray) -> np.ndarray:
    """Flat positions from relative skips: p_i = p_{i-1} + skip_i + 1, with p_{-1} = -1."""
    return np.cumsum(np.asarray(skips, dtype=np.int64) + 1) - 1
