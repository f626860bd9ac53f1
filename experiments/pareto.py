"""Accuracy vs mean FLOPs ratio: the Pareto front of each method (gate family, static baseline) of a sweep.

Reads one or more ``summary.csv`` files written by ``dynprune sweep`` (columns ``method``, ``lam``, ``acc``,
``flops_mean_ratio``, ``flops_p90_ratio``; unfinished runs are skipped) and, optionally, static-pruning
tables written by ``experiments/static_pruning.py`` (``--static``). With ``--x latency`` the cost axis is the
measured latency (a ``latency_ms`` column, e.g. from ``experiments/bench_latency.py`` timings joined into the
tables; points without one are left out) instead of the FLOPs ratio. Writes ``<out>.png`` (one curve per
method through its non-dominated runs, dominated runs hollow, dense runs as a star) and ``<out>.md``.

    python experiments/pareto.py runs/lam/summary.csv runs/lam_dense/summary.csv --out experiments/results/pareto_lam
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynprune.io import atomic_write, save_figure


@dataclass(frozen=True)
class Point:
    """One finished run: accuracy in [0, 1], FLOPs as a fraction of the dense model's."""

    method: str
    acc: float
    flops: float
    flops_p90: float | None = None
    lam: float | None = None
    run: str = ""
    latency_ms: float | None = None

    def cost(self, x: str) -> float:
        """The cost on axis ``x``: ``flops`` (ratio to dense) or ``latency`` (measured ms per input)."""
        if x == "flops":
            return self.flops
        if x == "latency" and self.latency_ms is not None:
            return self.latency_ms
        raise ValueError(f"point '{self.run}' has no cost on axis {x!r}; axes: flops, latency (needs latency_ms)")


def pareto_front(points: Sequence[Point], x: str = "flops") -> list[int]:
    """Indices of the non-dominated points (no other point is at most as costly on axis ``x`` and at least as
    accurate, and better in one), ordered by cost; of identical points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i].cost(x), -points[i].acc, i))
    front: list[int] = []
    for i in order:
        if not front or points[i].acc > points[front[-1]].acc:
            front.append(i)
    return front


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "", "None", "nan") else None


def read_summary(path: str | Path) -> list[Point]:
    """Finished runs of a ``dynprune sweep`` summary.csv."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    points = []
    for row in rows:
        acc, flops = _float(row.get("acc")), _float(row.get("flops_mean_ratio"))
        if row.get("status", "finished") != "finished" or acc is None or flops is None:
            continue
        method = row.get("method") or row.get("gate") or "dense"
        points.append(Point(method, acc, flops, _float(row.get("flops_p90_ratio")), _float(row.get("lam")),
                            row.get("run", ""), _float(row.get("latency_ms"))))
    return points


def read_static(path: str | Path) -> list[Point]:
    """Pruned models of an ``experiments/static_pruning.py`` table (acc in %, ``flops_reduction`` = dense/pruned);
    its own dense row is left out (it belongs to that script's budget, not the sweep's)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    points = []
    for row in rows:
        match = re.fullmatch(r"\S+ (\S+) ([\d.]+)x", row["model"])
        if match:
            ratio = 1.0 / float(row["flops_reduction"])
            points.append(Point(f"static_{match[1]}", float(row["acc"]) / 100, ratio, ratio, None, row["model"]))
    return points


def read_iso(path: str | Path) -> list[Point]:
    """Rows of an ``experiments/iso_flops.py`` table (``method``, acc in %, ``flops_ratio``, ``p90_ratio``)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [Point(row["method"].replace(" ", "_"), float(row["acc"]) / 100, float(row["flops_ratio"]),
                  float(row["p90_ratio"]), None, f"R={row['R']}", _float(row.get("latency_ms"))) for row in rows]


def read_slimmable(path: str | Path) -> list[Point]:
    """Rows of an ``experiments/slimmable.py`` table: one point per width for the supernet at that width
    (``slimmable_fixed_width``) and one for the thin network trained alone (``thin_trained_alone``)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    points = []
    for row in rows:
        ratio = float(row["FLOPs ratio"])
        run = f"w={row['width']}"
        points.append(Point("slimmable_fixed_width", float(row["slimmable acc"]), ratio, ratio, None, run))
        points.append(Point("thin_trained_alone", float(row["thin acc"]), ratio, ratio, None, run))
    return points


def _order(method: str) -> tuple[int, str]:
    return (0 if method == "dense" else 2 if method.startswith("static") else 1, method)


def by_method(points: Sequence[Point]) -> dict[str, list[Point]]:
    """Points grouped by method: dense first, then gate families, then static baselines; each sorted by lam."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    return {m: sorted(groups[m], key=lambda p: (p.lam is None, p.lam or 0.0, p.flops))
            for m in sorted(groups, key=_order)}


def markdown_table(points: Sequence[Point]) -> str:
    """One row per run: method, lam, accuracy (%), mean / p90 FLOPs ratio, whether it is on its method's front."""
    lines = ["| method | λ | accuracy (%) | mean FLOPs ratio | p90 FLOPs ratio | on front | run |",
             "|---|---:|---:|---:|---:|:---:|---|"]
    for method, group in by_method(points).items():
        front = set(pareto_front(group))
        for i, p in enumerate(group):
            lam = "–" if p.lam is None or method == "dense" else f"{p.lam:g}"
            p90 = "–" if p.flops_p90 is None else f"{p.flops_p90:.3f}"
            lines.append(f"| {method} | {lam} | {100 * p.acc:.2f} | {p.flops:.3f} | {p90} | "
                         f"{'✓' if i in front else ''} | {p.run} |")
    return "\n".join(lines) + "\n"


def plot(points: Sequence[Point], path: str | Path, title: str, axis: str = "flops") -> None:
    """Accuracy (%) vs mean FLOPs ratio (or measured latency, ``axis="latency"``), one front per method; dense
    runs as black stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = itertools.cycle(plt.get_cmap("tab20").colors)  # more methods than the default 10 colours
    for method, group in by_method(points).items():
        xs, ys = [p.cost(axis) for p in group], [100 * p.acc for p in group]
        if method == "dense":
            ax.scatter(xs, ys, marker="*", s=220, color="black", zorder=5, label="dense")
            continue
        color = next(colors)
        front = pareto_front(group, axis)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color=color, label=f"{method} (front)")
        dominated = [i for i in range(len(group)) if i not in front]
        ax.scatter([xs[i] for i in dominated], [ys[i] for i in dominated], facecolors="none", edgecolors=color)
        for p, x, y in zip(group, xs, ys, strict=True):
            if p.lam is not None:
                ax.annotate(f"λ={p.lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
    ax.set_xlabel("mean effective FLOPs / dense FLOPs (per input, test set)" if axis == "flops"
                  else "measured latency (ms per batch)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="*", type=Path, help="summary.csv files of `dynprune sweep`")
    parser.add_argument("--static", nargs="*", type=Path, default=[], help="static_pruning_*.csv tables")
    parser.add_argument("--iso", nargs="*", type=Path, default=[], help="iso_flops_*.csv tables")
    parser.add_argument("--slimmable", nargs="*", type=Path, default=[], help="slimmable_*.csv tables")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.png and OUT.md")
    parser.add_argument("--title", default="Accuracy vs mean FLOPs")
    parser.add_argument("--x", choices=("flops", "latency"), default="flops",
                        help="cost axis: FLOPs ratio, or measured latency (rows with a latency_ms column)")
    parser.add_argument("--exclude", default=None, help="leave out methods matching this regular expression")
    args = parser.parse_args(argv)
    points = [p for path in args.summaries for p in read_summary(path)]
    points += [p for path in args.static for p in read_static(path)]
    points += [p for path in args.iso for p in read_iso(path)]
    points += [p for path in args.slimmable for p in read_slimmable(path)]
    if args.exclude:
        points = [p for p in points if not re.search(args.exclude, p.method)]
    if not points:
        inputs = ", ".join(map(str, [*args.summaries, *args.static, *args.iso, *args.slimmable]))
        parser.error(f"no finished runs with acc and flops_mean_ratio in {inputs or 'no files (pass some)'}")
    if args.x == "latency":
        points = [p for p in points if p.latency_ms is not None]
        if not points:
            parser.error("--x latency: no finished run has a latency_ms value")
    png = args.out.with_name(args.out.name + ".png")
    plot(points, png, args.title, args.x)
    table = markdown_table(points)
    text = f"![{args.title}]({png.name})\n\n{table}"
    atomic_write(args.out.with_name(args.out.name + ".md"), lambda f: f.write(text))
    print(table)


if __name__ == "__main__":
    main()
