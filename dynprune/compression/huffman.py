"""Canonical Huffman coding of integer symbol streams with ``bitarray`` (Deep Compression stage 3).

A stream's size counts its encoded bits *and* its code table, stored canonically as the number of
symbols of each code length (``COUNT_BITS`` each) plus the symbols in canonical order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

COUNT_BITS = 16


@dataclass(frozen=True)
class HuffmanStream:
    """An encoded symbol stream with its canonical decoding table."""

    bits: bitarray
    count: list[int]
    symbols: list[int]
    length: int
    symbol_bits: int

    @property
    def table_bits(self) -> int:
        """Bits of the canonical table: per-length counts plus the symbols in canonical order."""
        return len(self.count) * COUNT_BITS + len(self.symbols) * self.symbol_bits

    @property
    def total_bits(self) -> int:
        """Encoded payload plus table."""
        return len(self.bits) + self.table_bits


def huffman_encode(symbols: np.ndarray) -> HuffmanStream:
    """Huffman-code a 1-D array of non-negative integers."""
    values = np.asarray(symbols).reshape(-1)
    if values.size and (values.min() < 0 or not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"symbols must be non-negative integers, got dtype {values.dtype}, min {values.min()}")
    seq = values.tolist()
    bits = bitarray()
    if not seq:
        return HuffmanStream(bits, [], [], 0, 1)
    code, count, order = canonical_huffman(Counter(seq))
    bits.encode(code, seq)
    return HuffmanStream(bits, list(count), list(order), len(seq), max(1, int(values.max()).bit_length()))


def huffman_decode(stream: HuffmanStream) -> np.ndarray:
    """The int64 symbol array that ``huffman_encode`` was given."""
    if stream.length == 0:
        return np.zeros(0, np.int64)
    out = np.fromiter(canonical_decode(stream.bits, stream.count, stream.symbols), np.int64)
    if out.size != stream.length:
        raise ValueError(f"decoded {out.size} symbols, expected {stream.length}")
    return out
