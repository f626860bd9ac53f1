"""Does pricing decisions by measured latency pick other masks than pricing them by FLOPs, and what do they run at?

ResNet-20 with sigmoid channel gates on a Fashion-MNIST subset, two arms with the same recipe, seed and dense warm
start; only the cost differs:
- ``flops``: target mode at ``--flops-target`` (effective-FLOPs ratio);
- ``latency``: target mode at the predicted-latency ratio that the FLOPs arm reached on the test images, from a
  lookup table profiled through the compiled runtime on this machine (``dynprune.runtime.profile``), so both arms
  stand at equal predicted latency.
For each arm: test accuracy, FLOPs ratio, predicted latency ratio, each gated layer's kept fraction, and the measured
batch-1 latency of the compiled model (dispatched, and its thin path) against its BN-folded dense twin, timed in
interleaved rounds (1 thread, process CPU time: the machine is shared), reported as ratios.

    python experiments/latency_vs_flops.py                      # writes experiments/results/latency_vs_flops.{csv,md}
    python experiments/latency_vs_flops.py --smoke --out /tmp/x # seconds: tiny subset, one step per phase
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils import benchmark

from dynprune.data import FashionMNISTDataModule
from dynprune.inject import collect_masks
from dynprune.io import to_markdown, write_csv
from dynprune.latency import dense_twin
from dynprune.module import GatedClassifier
from dynprune.runtime import compile_for_inference
from dynprune.runtime.profile import LatencyTable, machine, profile_latency
from dynprune.task import QUIET

RESULTS = Path(__file__).parent / "results"


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """GatedClassifier arguments shared by both arms."""
    return dict(backbone="resnet20", gate="sigmoid", lam=2.0, lr=0.1, gate_lr=1.0, dense_epochs=args.dense_epochs)


def train(args: argparse.Namespace, cost: str, target: float, table: Path | None) -> GatedClassifier:
    """One arm: dense warm start then gated epochs, seeded identically."""
    L.seed_everything(args.seed, workers=True)
    module = GatedClassifier(**recipe(args), cost=cost, target=target,
                             latency_table=str(table) if table is not None else None)
    limits = {"limit_train_batches": 1, "limit_val_batches": 1} if args.smoke else {}
    trainer = L.Trainer(max_epochs=args.dense_epochs + args.gated_epochs, deterministic=True, **QUIET, **limits)
    trainer.fit(module, data(args))
    return module.eval()


def data(args: argparse.Namespace) -> FashionMNISTDataModule:
    """The Fashion-MNIST subset of this experiment."""
    return FashionMNISTDataModule(batch_size=128, train_subset=args.train_subset, test_subset=args.test_subset,
                                  seed=args.seed)


@torch.no_grad()
def evaluate(module: GatedClassifier, x: Tensor, y: Tensor, table: LatencyTable) -> dict[str, Any]:
    """Accuracy, FLOPs ratio, predicted latency ratio and each site's kept fraction on the test images."""
    logits, masks = [], []
    for xb in x.split(256):
        logits.append(module.model(xb))
        masks.append({n: m.detach() for n, m in collect_masks(module.model).items()})
    joined = {n: torch.cat([m[n] for m in masks]) for n in masks[0]}
    row = {"acc": float((torch.cat(logits).argmax(1) == y).float().mean()),
           "flops_ratio": float(module.profile.ratio(joined).mean()),
           "predicted_latency_ratio": float(table.cost(joined).mean())}
    row.update({f"keep {n}": float(m.mean()) for n, m in joined.items()})
    return row


def timed(models: dict[str, nn.Module], images: Tensor, rounds: int) -> dict[str, float]:
    """Median ms per image of each model called one image at a time, rounds interleaved across models."""
    xs = list(images.split(1))
    timers = {name: benchmark.Timer("for x in xs: m(x)", globals={"m": m, "xs": xs}, num_threads=1,
                                    timer=time.process_time) for name, m in models.items()}
    for t in timers.values():
        t.timeit(1)  # warm
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.timeit(1).median / len(xs))
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=int, default=12000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--dense-epochs", type=int, default=1)
    parser.add_argument("--gated-epochs", type=int, default=2)
    parser.add_argument("--flops-target", type=float, default=0.5)
    parser.add_argument("--timed-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one batch per phase, a tiny subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency_vs_flops")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_subset, args.test_subset, args.timed_images, args.rounds = 640, 128, 4, 1
    torch.set_num_threads(1)
    start, load_start = time.time(), os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table_path = args.out.with_name(args.out.name + "_table.json")
    shape_model = GatedClassifier(**recipe(args)).model.eval()
    table = profile_latency(shape_model, rounds=1 if args.smoke else 5)
    table.save(table_path)
    print(f"latency table: every unit kept {table.full_ms:.3f} ms, written to {table_path}")
    dm = data(args)
    dm.setup("test")
    x, y = (torch.cat(t) for t in zip(*dm.test_dataloader(), strict=True))
    arms: dict[str, tuple[GatedClassifier, dict[str, Any]]] = {}
    module = train(args, "flops", args.flops_target, None)
    arms["flops"] = (module, {"cost": "flops", "target": args.flops_target, **evaluate(module, x, y, table)})
    latency_target = arms["flops"][1]["predicted_latency_ratio"]
    module = train(args, "latency", latency_target, table_path)
    arms["latency"] = (module, {"cost": "latency", "target": latency_target, **evaluate(module, x, y, table)})
    images = x[: args.timed_images]
    models: dict[str, nn.Module] = {}
    for name, (module, _) in arms.items():
        models[f"dense {name}"] = compile_for_inference(dense_twin(module), dispatch=())
        models[f"compiled {name}"] = compile_for_inference(module.model, dispatch=(1,), example=images)
        models[f"thin {name}"] = compile_for_inference(module.model, dispatch=()).pin("thin")
    load_timing = os.getloadavg()
    ms = timed(models, images, args.rounds)
    rows = []
    for name, (_, row) in arms.items():
        plan = models[f"compiled {name}"].plan
        rows.append({**{k: row[k] for k in ("cost", "target", "acc", "flops_ratio", "predicted_latency_ratio")},
                     "dense_ms": ms[f"dense {name}"], "compiled_ms": ms[f"compiled {name}"],
                     "path": plan.path(1), "speedup_compiled": ms[f"dense {name}"] / ms[f"compiled {name}"],
                     "speedup_thin": ms[f"dense {name}"] / ms[f"thin {name}"],
                     "speedup_theoretical": 1 / row["flops_ratio"],
                     "measured_latency_ratio_thin": ms[f"thin {name}"] / ms[f"dense {name}"],
                     **{k: v for k, v in row.items() if k.startswith("keep ")}})
    write_csv(args.out.with_suffix(".csv"), rows)
    summary = [{k: v for k, v in r.items() if not k.startswith("keep ")} for r in rows]
    keep = [{"site": k.removeprefix("keep "), **{r["cost"]: r[k] for r in rows},
             "table ms saved per channel off": _slope(table, k.removeprefix("keep "))}
            for k in rows[0] if k.startswith("keep ")]
    text = (f"# Latency cost vs FLOPs cost: ResNet-20 channel gates, Fashion-MNIST subset\n\n"
            f"Command: `python experiments/latency_vs_flops.py{' --smoke' if args.smoke else ''}` "
            f"(train subset {args.train_subset}, test subset {args.test_subset}, {args.dense_epochs} dense + "
            f"{args.gated_epochs} gated epochs, seed {args.seed}, 1 thread; {time.time() - start:.0f} s in all).\n"
            f"Machine: {machine()}; shared with a background benchmark: load average {_load(load_start)} at the "
            f"start, {_load(load_timing)} before timing.\n"
            f"Latency table: `{table_path.name}` (batch 1, 1 thread, every unit kept {table.full_ms:.3f} ms). "
            f"Timing: {args.timed_images} test images one at a time, {args.rounds} interleaved rounds, process CPU "
            "time, median; speedups are dense / compiled within this run (each arm against its own BN-folded dense "
            "twin). `compiled` takes the path its dispatch plan chose at batch 1; `thin` runs only the kept "
            "compute.\n\n"
            f"{to_markdown(summary)}\n\n## Kept fraction per gated layer (test images)\n\n{to_markdown(keep)}\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)


def _slope(table: LatencyTable, site: str) -> float:
    """Milliseconds the table saves per channel turned off at site (all off vs all on, over the units)."""
    curve = table.sites[site]
    return (curve.ms[-1] - curve.ms[0]) / curve.units


def _load(avg: tuple[float, float, float]) -> str:
    return ", ".join(f"{v:.2f}" for v in avg)


if __name__ == "__main__":
    main()
