"""The compressed storage format of a pruned + weight-shared model, and its exact decoder.

Per Conv2d / Linear: a float32 codebook, the Huffman-coded cluster index of every stored entry
(index ``K`` marks a filler zero) and the Huffman-coded relative sparse index. Every other tensor of
the state dict (biases, BatchNorm) is kept as is. Sizes are read off these encoded streams, and the
same entries give the sizes of the earlier stages (CSR with float32 values; fixed-width codes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dynprune.compression.huffman import HuffmanStream, huffman_decode, huffman_encode
from dynprune.compression.quantize import shared_weights
from dynprune.compression.sparse import relative_encode, relative_positions

FLOAT_BITS = 32


@dataclass(frozen=True)
class CompressedLayer:
    """One layer's weight in Deep Compression form (``shape`` of the dense weight, ``fillers`` stored)."""

    shape: tuple[int, ...]
    centroids: np.ndarray
    codes: HuffmanStream
    skips: HuffmanStream
    index_bits: int
    fillers: int

    @property
    def entries(self) -> int:
        """Stored entries, filler zeros included."""
        return self.codes.length

    @property
    def code_bits(self) -> int:
        """Fixed width of a cluster index (one more code when fillers exist)."""
        return max(1, (len(self.centroids) - (self.fillers == 0)).bit_length())

    def stage_bits(self) -> dict[str, int]:
        """Bits of this weight after each stage: CSR float32, fixed-width codes, Huffman coded."""
        codebook = FLOAT_BITS * len(self.centroids)
        return {
            "pruned": self.entries * (FLOAT_BITS + self.index_bits),
            "quantized": self.entries * (self.code_bits + self.index_bits) + codebook,
            "huffman": self.codes.total_bits + self.skips.total_bits + codebook,
        }

    def decode(self) -> Tensor:
        """The dense float32 weight: centroid values at stored entries, zero elsewhere and at fillers."""
        codes, pos = huffman_decode(self.codes), relative_positions(huffman_decode(self.skips))
        values = np.append(self.centroids, np.float32(0))[codes]
        flat = np.zeros(int(np.prod(self.shape)), np.float32)
        flat[pos] = values
        return torch.from_numpy(flat.reshape(self.shape))


@dataclass(frozen=True)
class CompressedModel:
    """Compressed weights by layer name plus the remaining state-dict tensors, stored raw."""

    layers: dict[str, CompressedLayer]
    rest: dict[str, Tensor]

    def rest_bits(self) -> int:
        """Bits of the tensors kept uncompressed (biases, BatchNorm)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.rest.values())

    def stage_bits(self) -> dict[str, int]:
        """Total bits after each stage (pruned, quantized, huffman), uncompressed tensors included."""
        per_layer = [layer.stage_bits() for layer in self.layers.values()]
        return {stage: sum(b[stage] for b in per_layer) + self.rest_bits() for stage in per_layer[0]}

    def state_dict(self) -> dict[str, Tensor]:
        """The decoded state dict, loadable into the uncompressed architecture."""
        return {**self.rest, **{f"{name}.weight": layer.decode() for name, layer in self.layers.items()}}

    def decode_into(self, model: nn.Module) -> nn.Module:
        """Load the decoded weights into a plain (unparametrized) ``model`` of the same architecture."""
        model.load_state_dict(self.state_dict())
        return model


def compress_model(model: nn.Module, index_bits: Mapping[str, int]) -> CompressedModel:
    """Encode a model quantized by ``quantize_model``; ``index_bits`` gives the relative-index width of
    every quantized layer."""
    shared = shared_weights(model)
    missing = sorted(set(shared) ^ set(index_bits))
    if missing:
        raise ValueError(f"index_bits and the quantized layers differ on {missing}; quantized: {sorted(shared)}")
    layers = {}
    for name, sw in shared.items():
        mask, labels = sw.mask.cpu().numpy().reshape(-1), sw.labels.cpu().numpy().reshape(-1)
        index = relative_encode(mask, index_bits[name])
        k = len(sw.centroids)
        codes = np.where(index.filler, k, labels[index.positions()])
        layers[name] = CompressedLayer(tuple(sw.mask.shape), sw.centroids.detach().cpu().numpy().copy(),
                                       huffman_encode(codes), huffman_encode(index.skips), index_bits[name],
                                       int(index.filler.sum()))
    coded = tuple(f"{name}.parametrizations." for name in shared)
    rest = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(coded)}
    return CompressedModel(layers, rest)
