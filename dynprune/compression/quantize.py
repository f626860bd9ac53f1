"""Deep Compression stage 2: weight sharing by per-layer k-means, then centroid fine-tuning.

Each Conv2d / Linear weight becomes ``centroids[labels]`` on its non-zero (kept) entries and exactly 0
on pruned ones, through a ``torch.nn.utils.parametrize`` parametrization. The centroids are the only
trainable weight tensor: the backward of the gather ``centroids[labels]`` sums the gradients of all
weights of a cluster, which is Han et al.'s centroid update, and pruned weights can never move.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dynprune.static.prune import make_permanent, weight_layers


class SharedWeight(nn.Module):
    """Parametrization: weight = ``centroids[labels]`` where ``mask`` else 0; shapes as the weight."""

    def __init__(self, centroids: Tensor, labels: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("labels", labels)
        self.register_buffer("mask", mask)

    def forward(self, original: Tensor) -> Tensor:
        """Ignore the stored dense weight; rebuild it from the codebook."""
        return torch.where(self.mask, self.centroids[self.labels], self.centroids.new_zeros(()))


def kmeans_codebook(values: np.ndarray, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D ``values`` into at most 2**bits centroids with linear initialization (Han et al.).

    Returns (centroids (K,) float32, labels (len(values),) int64). K is smaller than 2**bits only
    when there are fewer distinct values.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if values.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    k = min(2**bits, len(np.unique(values)))
    init = np.linspace(values.min(), values.max(), k, dtype=np.float64).reshape(-1, 1)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, random_state=seed)
    labels = km.fit_predict(values.astype(np.float64).reshape(-1, 1))
    return km.cluster_centers_.reshape(-1).astype(np.float32), labels.astype(np.int64)


def layer_bits(model: nn.Module, conv_bits: int = 8, fc_bits: int = 5,
               overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bits per Conv2d / Linear: ``conv_bits`` for convs, ``fc_bits`` for linears, ``overrides`` by name."""
    layers = weight_layers(model)
    unknown = sorted(set(overrides or {}) - set(layers))
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} in bits; choose from: {', '.join(layers)}")
    bits = {n: conv_bits if isinstance(m, nn.Conv2d) else fc_bits for n, m in layers.items()}
    return bits | dict(overrides or {})


def quantize_model(model: nn.Module, bits: Mapping[str, int], seed: int = 0) -> dict[str, SharedWeight]:
    """Replace each named layer's weight by k-means shared weights (in place); pruning masks are folded
    first and zero weights stay pruned. Returns the parametrizations by layer name."""
    make_permanent(model)
    layers = weight_layers(model)
    shared = {}
    for name, nbits in bits.items():
        if name not in layers:
            raise ValueError(f"unknown layer '{name}'; choose from: {', '.join(layers)}")
        module = layers[name]
        w = module.weight.detach()
        mask = w != 0
        centroids, labels = kmeans_codebook(w[mask].cpu().numpy(), nbits, seed)
        full = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        full[mask] = torch.from_numpy(labels).to(w.device)
        shared[name] = SharedWeight(torch.from_numpy(centroids).to(w), full, mask)
        parametrize.register_parametrization(module, "weight", shared[name])
        module.parametrizations.weight.original.requires_grad_(False)
    return shared


def shared_weights(model: nn.Module) -> dict[str, SharedWeight]:
    """The ``SharedWeight`` parametrization of every quantized layer of ``model``, by layer name."""
    return {
        name: p for name, m in weight_layers(model).items() if parametrize.is_parametrized(m, "weight")
        for p in m.parametrizations.weight if isinstance(p, SharedWeight)
    }


def bake(model: nn.Module) -> nn.Module:
    """Replace every shared-weight parametrization by the plain weight it produces (in place)."""
    for m in weight_layers(model).values():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model
