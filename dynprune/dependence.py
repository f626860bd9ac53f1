"""Input-dependence statistics: do the gates give different inputs different masks and costs?

A "dynamic" method whose masks are the same for every input is static pruning; these numbers show
which one a run learnt. A unit (channel, or a whole block for an (N, 1) decision) counts as *on* for
an input where its mask is nonzero, i.e. where its compute must run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dynprune.io import save_figure

_WORD_BITS = 64


def count_unique_rows(hard: Tensor) -> int:
    """Number of distinct rows of a boolean (N, U) matrix, each row packed into int64 words of 64 bits."""
    pad = (-hard.shape[1]) % _WORD_BITS
    bits = rearrange(F.pad(hard.to(torch.int64), (0, pad)), "n (w b) -> n w b", b=_WORD_BITS)
    # 2**63 wraps to -2**63: a sum of distinct powers of two stays a bitwise OR, so packing is injective
    weights = 2 ** torch.arange(_WORD_BITS, dtype=torch.int64, device=hard.device)
    words = (bits * weights).sum(-1)
    unique = torch.unique(words[:, 0]) if words.shape[1] == 1 else torch.unique(words, dim=0)
    return int(unique.shape[0])


def _site_stats(name: str, mask: Tensor, low: float, high: float) -> dict[str, Any]:
    """Keep rate, execution rate, dynamic units and unique masks of one site's (N, U) masks."""
    hard = mask != 0
    on_rate = hard.double().mean(dim=0)
    dynamic = int(((on_rate >= low) & (on_rate <= high)).sum())
    return {"site": name, "units": int(mask.shape[1]), "keep": float(mask.double().mean()),
            "exec_rate": float(hard.any(dim=1).double().mean()), "dynamic_units": dynamic,
            "dynamic_frac": dynamic / mask.shape[1], "unique_masks": count_unique_rows(hard)}


def _class_stats(ratio: Tensor, labels: Tensor, num_classes: int | None) -> tuple[list[dict[str, Any]], float | None]:
    """Mean FLOPs ratio per class of ``labels`` (N,) and the max/min spread over classes with inputs."""
    labels = labels.to(device=ratio.device, dtype=torch.long)
    if labels.shape != ratio.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(ratio.shape)} like flops")
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        raise ValueError(f"labels span [{int(labels.min())}, {int(labels.max())}]; allowed: 0 to "
                         f"{'num_classes - 1' if num_classes is None else num_classes - 1}")
    counts = torch.bincount(labels, minlength=num_classes or 0)
    sums = torch.bincount(labels, weights=ratio, minlength=num_classes or 0)
    means = sums / counts.clamp(min=1)
    classes = [{"class": c, "inputs": int(n), "flops_ratio": float(m) if n > 0 else None}
               for c, (n, m) in enumerate(zip(counts.tolist(), means.tolist(), strict=True))]
    present = means[counts > 0]
    spread = float(present.max() / present.min()) if present.min() > 0 else None
    return classes, spread


def input_dependence(masks: dict[str, Tensor], flops: Tensor, labels: Tensor | None, dense: float,
                     num_classes: int | None = None, low: float = 0.05, high: float = 0.95) -> dict[str, Any]:
    """Input-dependence statistics of masks ``{site: (N, U)}`` and per-input FLOPs (N,) over an eval set.

    Per-position masks (N, T, U) (a decision per token) count each of the N * T positions as an input of their
    site: keep, execution rate, dynamic units and unique masks are then per token (contextual sparsity), while
    the FLOPs statistics stay per input.

    Returns JSON-ready numbers: the mean and p10/p50/p90 of the per-input FLOPs ratio (``flops / dense``) and
    p90/p10; per site its mean keep, execution rate (inputs with any unit on), number and fraction of
    dynamic units (on for a fraction of inputs in [low, high]) and number of unique masks; with
    ``labels`` (N,) the mean FLOPs ratio per class and its max/min spread. Ratios whose denominator is 0
    are None.
    """
    if flops.ndim != 1 or flops.numel() == 0:
        raise ValueError(f"flops must be a non-empty (N,) tensor; got shape {tuple(flops.shape)}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"dynamic thresholds low={low}, high={high}; need 0 <= low <= high <= 1")
    if dense <= 0:
        raise ValueError(f"dense FLOPs must be positive; got {dense}")
    n = flops.shape[0]
    for name, mask in masks.items():
        if mask.ndim not in (2, 3) or mask.shape[0] != n or mask.shape[-1] == 0:
            raise ValueError(f"mask of site '{name}' has shape {tuple(mask.shape)}; expected ({n}, units) or "
                             f"({n}, positions, units)")
    masks = {name: mask.flatten(0, -2) for name, mask in masks.items()}  # a position decides as an input does
    ratio = flops.double() / dense
    p10, p50, p90 = torch.quantile(ratio, torch.tensor([0.1, 0.5, 0.9], dtype=ratio.dtype, device=ratio.device))
    sites = [_site_stats(name, mask, low, high) for name, mask in masks.items()]
    units = sum(s["units"] for s in sites)
    stats: dict[str, Any] = {
        "inputs": n, "dynamic_range": [low, high], "flops_mean_ratio": float(ratio.mean()),
        "flops_p10_ratio": float(p10), "flops_p50_ratio": float(p50), "flops_p90_ratio": float(p90),
        "flops_p90_p10": float(p90 / p10) if p10 > 0 else None,
        "dynamic_frac": sum(s["dynamic_units"] for s in sites) / units if units else 0.0,
        "sites": sites, "classes": [], "class_spread": None,
    }
    if labels is not None:
        stats["classes"], stats["class_spread"] = _class_stats(ratio, labels, num_classes)
    return stats


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_dependence(stats: dict[str, Any]) -> str:
    """A plain-text block of :func:`input_dependence`'s numbers for the printed report."""
    low, high = stats["dynamic_range"]
    lines = [
        f"Input dependence ({stats['inputs']} inputs; a unit is dynamic if on for {low:.0%}-{high:.0%} of them)",
        f"  per-input FLOPs p10/p50/p90: {stats['flops_p10_ratio']:.3f} / {stats['flops_p50_ratio']:.3f} / "
        f"{stats['flops_p90_ratio']:.3f} of dense, p90/p10 {_fmt(stats['flops_p90_p10'], '.2f')}; "
        f"dynamic units {stats['dynamic_frac']:.1%}",
    ]
    if stats["sites"]:
        lines.append(f"  {'site':<28}{'units':>6}{'keep':>8}{'exec':>8}{'dynamic':>9}{'unique masks':>14}")
        lines += [f"  {s['site']:<28}{s['units']:>6}{s['keep']:>8.3f}{s['exec_rate']:>8.3f}"
                  f"{s['dynamic_frac']:>9.3f}{s['unique_masks']:>14}" for s in stats["sites"]]
        if all(s["unique_masks"] == 1 for s in stats["sites"]):
            lines.append("  every site gives all inputs the same mask: this is static pruning")
    if stats["classes"]:
        lines.append(f"  per-class mean FLOPs ratio (max/min {_fmt(stats['class_spread'], '.3f')}):")
        cells = [f"{c['class']}: {_fmt(c['flops_ratio'])}" for c in stats["classes"]]
        lines += ["    " + "  ".join(cells[i:i + 10]) for i in range(0, len(cells), 10)]
    return "\n".join(lines)


def plot_class_flops(stats: dict[str, Any], path: str | os.PathLike[str],
                     class_names: Sequence[str] | None = None) -> Path:
    """Write a bar chart of the mean per-input FLOPs ratio of each class to ``path`` (PNG)."""
    classes = stats["classes"]
    if not classes:
        raise ValueError("stats hold no per-class numbers; pass labels to input_dependence")
    if class_names is not None and len(class_names) != len(classes):
        raise ValueError(f"{len(class_names)} class names for {len(classes)} classes")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(class_names) if class_names is not None else [str(c["class"]) for c in classes]
    values = [c["flops_ratio"] or 0.0 for c in classes]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(classes)), 3.2))
    ax.bar(range(len(values)), values, color="tab:blue")
    mean = stats["flops_mean_ratio"]
    ax.axhline(mean, color="tab:red", ls="--", label=f"all inputs {mean:.3f}")
    ax.set_xticks(range(len(values)), names, rotation=0 if class_names is None else 45)
    ax.set_ylabel("mean FLOPs / dense FLOPs")
    ax.set_title(f"Per-class FLOPs (max/min {_fmt(stats['class_spread'], '.3f')})")
    ax.legend(loc="lower right")
    out = save_figure(fig, path)
    plt.close(fig)
    return out
