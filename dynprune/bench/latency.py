"""Measured latency of the benchmark's trained points: what each arm's FLOPs buy in time on this machine.

For every finished point, the trained network (``model.pt``; gates included) is compiled for inference
(``compile_for_inference``: BN folded, only the kept compute of each input runs, or the masked dense path where
that was faster at the batch size, in the faster memory layout, chosen on the same images) and timed against the
BN-folded dense model of the same seed (in its own faster layout per batch size), on the same test images, in
interleaved rounds (``torch.utils.benchmark``, median of the rounds): at batch 1 (one image per call) and at a
larger batch (one call). The speedup is a ratio measured in one run, printed beside the theoretical one (1 / the
point's test FLOPs ratio, gates included).

A token-reduction point (ToMe, EViT) is timed as the plain module it is: the runtime does not compile it, and
its sequence shortens by construction.

A static or thin point that finished before models were saved is timed on its architecture rebuilt from the
protocol (a dense network's time does not depend on its weights; the table says ``rebuilt``); a dynamic point
without a saved model is not timed, because its time depends on what its trained gates decide.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils import benchmark

from dynprune import backbones
from dynprune.bench.config import DENSE_KINDS, SCALES, BenchConfig, Point
from dynprune.bench.run import (
    MODEL,
    _static_model,
    code_version,
    datamodule,
    device_name,
    finished,
    input_shape,
    shape_kwargs,
)
from dynprune.io import write_json
from dynprune.latency import median_seconds
from dynprune.module import GatedClassifier
from dynprune.runtime import compile_for_inference

LATENCY = "latency.json"


def _load_dense(cfg: BenchConfig, seed: int, root: Path) -> nn.Module:
    """The trained dense network of ``seed`` (from its checkpoint)."""
    module = GatedClassifier(cfg.backbone, gate=None, init_from=str(root / f"dense_s{seed}" / "dense.ckpt"),
                             **shape_kwargs(cfg))
    return module.model


def trained_network(cfg: BenchConfig, point: Point, root: Path, record: dict[str, Any]) -> tuple[nn.Module, str] | None:
    """The network a point trained and where it came from (``saved`` or ``rebuilt``), None when it cannot be
    timed faithfully (a dynamic point whose gates were not saved)."""
    path = root / point.id / MODEL
    if path.is_file():
        return torch.load(path, weights_only=False, map_location="cpu"), "saved"
    if point.kind == "thin":
        scale = {k: v for k, v in record["chosen"].items() if k in SCALES.values()}
        return backbones.create(cfg.backbone, **scale, **shape_kwargs(cfg)), "rebuilt"
    if point.kind == "static":
        L.seed_everything(point.seed, verbose=False)
        dm = datamodule(cfg, point.seed)
        small, _ = _static_model(cfg, point, root / f"dense_s{point.seed}" / "dense.ckpt", dm)
        return small, "rebuilt"
    return None


def time_pair(dense: nn.Module, compiled: nn.Module, images: Tensor, batch: int, threads: int, rounds: int,
              min_run_time: float) -> tuple[float, float]:
    """Median seconds per image of (dense, compiled) at ``batch``, timed in ``rounds`` interleaved rounds."""
    times: dict[str, list[float]] = {"dense": [], "compiled": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("compiled", compiled)):
            if batch == 1:
                times[name].append(median_seconds(model, images, threads, min_run_time))
            else:
                timer = benchmark.Timer("model(x)", globals={"model": model, "x": images[:batch]},
                                        num_threads=threads)
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median / batch)
    return statistics.median(times["dense"]), statistics.median(times["compiled"])


@torch.no_grad()
def measure_point(cfg: BenchConfig, point: Point, root: Path, batches: tuple[int, ...] = (1, 64), images: int = 64,
                  rounds: int = 3, min_run_time: float = 0.3) -> dict[str, Any] | None:
    """Time one finished point against its seed's dense model and write ``<point>/latency.json``; returns the
    record, or None when the point is unfinished or cannot be timed."""
    record = finished(cfg, point, root)
    if record is None or point.kind in (*DENSE_KINDS, "slimmable"):
        return None
    found = trained_network(cfg, point, root, record)
    if found is None:
        return None
    network, source = found
    if max(batches) > images:
        raise ValueError(f"batch sizes {batches} exceed the {images} images timed")
    torch.set_num_threads(cfg.threads)
    dm = datamodule(cfg, point.seed)
    dm.setup("test")
    xs = torch.cat([x for x, _ in dm.test_dataloader()])[:images]
    shape = input_shape(cfg)
    # what a user runs: each batch size takes the faster exact path, chosen on these images (runtime dispatch); a
    # token reduction runs as it is
    compiled = network.eval() if point.kind == "reduce" else compile_for_inference(
        network.eval(), input_shape=shape, dispatch=batches, example=xs)
    # the dense model takes the faster memory layout per batch size as well, chosen on the same images
    dense = compile_for_inference(_load_dense(cfg, point.seed, root).eval(), input_shape=shape, dispatch=batches,
                                  example=xs)
    theory = 1.0 / record["test"]["flops_ratio"]
    plan = getattr(compiled, "plan", None)
    out: dict[str, Any] = {"point": point.id, "source": source, "dispatch": plan.rows() if plan else None,
                           "dense_dispatch": dense.plan.rows(),
                           "device": device_name("cpu"), "threads": cfg.threads,
                           "load_avg_1m": os.getloadavg()[0], "images": len(xs), "rounds": rounds,
                           "theoretical_speedup": theory, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "code": code_version()}
    for batch in batches:
        dense_s, compiled_s = time_pair(dense, compiled, xs, batch, cfg.threads, rounds, min_run_time)
        out[f"b{batch}"] = {"dense_ms_per_image": 1e3 * dense_s, "ms_per_image": 1e3 * compiled_s,
                            "speedup": dense_s / compiled_s, "of_theoretical": dense_s / compiled_s / theory}
    write_json(root / point.id / LATENCY, out)
    return out


def measure_all(cfg: BenchConfig, points: list[Point], root: Path, refresh: bool = False) -> list[str]:
    """Time every finished point of ``points`` not yet timed (all of them with ``refresh``); returns the
    ids of the points that could not be timed."""
    skipped = []
    for point in points:
        if not refresh and (root / point.id / LATENCY).is_file():
            continue
        if point.kind in (*DENSE_KINDS, "slimmable") or finished(cfg, point, root) is None:
            continue
        result = measure_point(cfg, point, root)
        if result is None:
            skipped.append(point.id)
            continue
        b = ", ".join(f"batch {k[1:]}: {v['speedup']:.2f}x" for k, v in result.items() if k.startswith("b"))
        print(f"{point.id}: {b} (theory {result['theoretical_speedup']:.2f}x, {result['source']})", flush=True)
    return skipped
