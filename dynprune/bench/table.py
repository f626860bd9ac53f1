"""The benchmark's table: per (method, R) mean +- std over seeds, the FLOPs actually reached, input
dependence, and a Welch t-test against the strongest baseline at that R; per-run lines in a jsonl, a
Pareto plot, and the aims of DESIGN.md checked against the best dynamic recipe (chosen on validation).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from dynprune.bench.config import BASELINE_KINDS, DENSE_KINDS, SCALES, BenchConfig, FairnessError
from dynprune.bench.run import REJECTED, finished
from dynprune.io import atomic_write, save_figure, to_markdown, write_csv

# DESIGN.md's accuracy aims: at R, the best dynamic recipe beats the strongest fair baseline by this many
# points at p < 0.05, with input-dependent masks (ratio of mean p90/p10 and per-class FLOPs spread).
AIMS = {4.0: 0.5, 8.0: 1.0, 16.0: 2.0}
AIM_P90_P10, AIM_CLASS_SPREAD, ALPHA = 1.5, 1.3, 0.05
# Below these a dynamic row's masks are (nearly) the same for every input: static pruning with extra steps.
STATIC_P90_P10, STATIC_DYNAMIC_FRAC = 1.05, 0.01
# Decimals kept in the csv: well past what the md shows, so that each md cell is rounded once, from the exact value.
KEEP = 6


def _welch(a: Sequence[float], b: Sequence[float]) -> Any:
    """scipy's two-sided Welch t-test of two samples, None when either has < 2 values or both are constant (no
    variance to test against)."""
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    return stats.ttest_ind(a, b, equal_var=False)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch t-test p-value of two samples (scipy), None when :func:`_welch` is."""
    test = _welch(a, b)
    return None if test is None else float(test.pvalue)


def welch_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of mean(a) - mean(b) from Welch's t (scipy), None where :func:`welch_p`
    is None. With 3 seeds a tie is only as tight as this interval: its upper end says which gains the data rule
    out."""
    test = _welch(a, b)
    if test is None:
        return None
    ci = test.confidence_interval(level)
    return float(ci.low), float(ci.high)


def collect_runs(cfg: BenchConfig, root: Path) -> list[dict[str, Any]]:
    """One flat line per finished run and R of the config (a slimmable supernet gives one line per such R, of the
    widths it reports), test metrics as ``acc`` etc. and the validation ones as ``val_acc`` etc."""
    runs = []
    for point in cfg.points():
        record = finished(cfg, point, root)
        if record is None:
            continue
        per_ratio = ({r: split for r, split in record["per_ratio"].items() if float(r) in cfg.ratios}
                     if "per_ratio" in record else
                     {f"{point.ratio or 1:g}": {"val": record["val"], "test": record["test"]}})
        for r, split in per_ratio.items():
            line = {k: record.get(k) for k in ("point", "method", "arm", "kind", "kd", "seed", "epochs", "total_epochs",
                                               "device", "threads", "teacher", "teacher_digest", "checkpoint_digest",
                                               "chosen", "fit_seconds", "code")}
            line["R"] = float(r)
            line.update(_latency(root / point.id))
            line.update(split["test"])
            line.update({f"val_{k}": v for k, v in split["val"].items()})
            runs.append(line)
    return runs


def _latency(run_dir: Path) -> dict[str, Any]:
    """A run's measured speedups over its seed's dense model (``latency.json`` of :mod:`dynprune.bench.latency`),
    empty when it was not timed."""
    path = run_dir / "latency.json"
    if not path.is_file():
        return {}
    lat = json.loads(path.read_text())
    out: dict[str, Any] = {"latency_source": lat["source"], "latency_device": lat["device"],
                           "latency_load_avg": lat["load_avg_1m"]}
    for key, value in lat.items():
        if key.startswith("b") and isinstance(value, dict):
            out[f"speedup_{key}"] = value["speedup"]
            out[f"of_theory_{key}"] = value["of_theoretical"]
    return out


def _median_of(group: list[dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over the runs that have it (rounded), None when none has it."""
    values = [r[key] for r in group if r.get(key) is not None]
    return round(statistics.median(values), KEEP) if values else None


def check_runs(cfg: BenchConfig, runs: list[dict[str, Any]]) -> None:
    """FairnessError unless the finished runs obey the protocol: each arm's total epochs equal the budget,
    every ``+kd`` run distilled from the dense checkpoint of its own seed, every pruned run's validation
    FLOPs lie within the tolerance of 1/R."""
    dense = {r["seed"]: r["checkpoint_digest"] for r in runs if r["kind"] == "dense"}
    for r in runs:
        if r["kind"] in DENSE_KINDS:
            continue
        budget = cfg.budget(cfg.arm(r["arm"]))
        if r["total_epochs"] != budget:
            raise FairnessError(f"{r['point']} trained {r['total_epochs']} epochs in all, the budget is {budget}")
        if r["kd"] and r["teacher_digest"] != dense.get(r["seed"]):
            raise FairnessError(f"{r['point']} distilled from a teacher ({r['teacher_digest']}) that is not the dense "
                                f"model of seed {r['seed']} ({dense.get(r['seed'])})")
        off = r["val_flops_ratio"] * r["R"] - 1
        if abs(off) > cfg.flops_tolerance:
            raise FairnessError(f"{r['point']}: validation FLOPs ratio {r['val_flops_ratio']:.5f} is {100 * off:+.2f}% "
                                f"off 1/{r['R']:g}")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _selected_on(kind: str, chosen: dict[str, Any] | None) -> str:
    scale = next((name for name, arg in SCALES.items() if arg in (chosen or {})), "width")
    what = {"dense": "nothing chosen", "reference": "nothing chosen (a reference, not a baseline)",
            "static": "prune fraction: FLOPs bisection (no data)",
            "thin": f"{scale}: FLOPs search (no data)",
            "slimmable": "width: FLOPs search (no data)", "reduce": "token schedule: FLOPs search (no data)",
            "dynamic": "target 1/R; FLOPs checked on val"}[kind]
    return f"{what}; last epoch (no ckpt choice); test once"


def aggregate(cfg: BenchConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows: per (method, R) over seeds, with the Welch p-value against the strongest baseline."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["R"]), []).append(r)
    rows = []
    for (method, ratio), group in groups.items():
        g0, accs = group[0], [r["acc"] for r in group]
        p10, p90 = _mean([r["flops_p10"] for r in group]), _mean([r["flops_p90"] for r in group])
        flops = _mean([r["flops_ratio"] for r in group])
        rows.append({
            "protocol": cfg.protocol, "method": method, "kind": g0["kind"], "kd": bool(g0["kd"]), "R": ratio,
            "n_seeds": len(group), "acc_mean": round(_mean(accs), KEEP),
            "acc_std": round(statistics.stdev(accs), KEEP) if len(accs) > 1 else None,
            "val_acc_mean": round(_mean([r["val_acc"] for r in group]), KEEP),
            "flops_ratio": round(flops, KEEP), "achieved_R": round(1 / flops, KEEP),
            "val_flops_ratio": round(_mean([r["val_flops_ratio"] for r in group]), KEEP),
            "p90_p10": round(p90 / p10, KEEP) if p10 > 0 else None,
            "class_spread": round(_mean([r["class_spread"] for r in group]), KEEP),
            "dynamic_frac": round(_mean([r["dynamic_frac"] for r in group]), KEEP),
            "speedup_b1": _median_of(group, "speedup_b1"), "of_theory_b1": _median_of(group, "of_theory_b1"),
            "speedup_b64": _median_of(group, "speedup_b64"),
            "n_timed": sum(r.get("speedup_b1") is not None for r in group),
            "latency_source": " ".join(sorted({r["latency_source"] for r in group if r.get("latency_source")})),
            "latency_device": "; ".join(sorted({r["latency_device"] for r in group if r.get("latency_device")})),
            "latency_load_avg": _median_of(group, "latency_load_avg"),
            "best_baseline": None, "delta_vs_best": None, "delta_ci95_low": None, "delta_ci95_high": None,
            "p_vs_best_baseline": None, "win": False,
            "headline_valid": len(group) >= cfg.min_seeds, "best_dynamic_by_val": False,
            "epochs": g0["epochs"], "total_epochs": g0["total_epochs"],
            "selected_on": _selected_on(g0["kind"], g0.get("chosen")),
            "seeds": " ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"])),
            "device": "; ".join(sorted({r["device"] for r in group})), "_accs": accs})
    for ratio in sorted({r["R"] for r in rows}):
        at_r = [r for r in rows if r["R"] == ratio]
        baselines = [r for r in at_r if r["kind"] in BASELINE_KINDS]
        dynamic = [r for r in at_r if r["kind"] == "dynamic"]
        if dynamic:  # among recipes with every seed on budget (a recipe that lost seeds to the budget check is not
            # chosen on its survivors); if none has, among all
            complete = [r for r in dynamic if r["headline_valid"]] or dynamic
            max(complete, key=lambda r: r["val_acc_mean"])["best_dynamic_by_val"] = True
        if not baselines:
            continue
        best = max(baselines, key=lambda r: r["acc_mean"])
        for r in at_r:
            if r is best or r["kind"] in DENSE_KINDS:
                continue
            r["best_baseline"] = best["method"]
            r["delta_vs_best"] = round(r["acc_mean"] - best["acc_mean"], KEEP)
            test = _welch(r["_accs"], best["_accs"])  # one test: its p-value and its interval
            if test is not None:
                ci = test.confidence_interval(0.95)
                r["p_vs_best_baseline"] = float(test.pvalue)
                r["delta_ci95_low"], r["delta_ci95_high"] = round(float(ci.low), KEEP), round(float(ci.high), KEEP)
            r["headline_valid"] = r["headline_valid"] and best["n_seeds"] >= cfg.min_seeds
            r["win"] = (r["kind"] == "dynamic" and r["delta_vs_best"] > 0 and r["p_vs_best_baseline"] is not None
                        and r["p_vs_best_baseline"] < ALPHA)
    order = {"dense": 0, "reference": 0.5, "static": 1, "thin": 2, "slimmable": 3, "reduce": 4, "dynamic": 5}
    rows.sort(key=lambda r: (r["R"], order[r["kind"]], r["total_epochs"] if r["kind"] == "reference" else 0,
                             r["method"]))  # dense references by their epochs
    for r in rows:
        del r["_accs"]
        if r["p_vs_best_baseline"] is not None:
            r["p_vs_best_baseline"] = float(f"{r['p_vs_best_baseline']:.6g}")
    return rows


def aims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DESIGN.md's aims at each R that has them: the best dynamic recipe (by validation accuracy) against
    the strongest baseline (by test accuracy), its margin, p-value, 95% interval and input dependence, the
    shortfall, and whether the interval rules the aimed margin out (its upper end below it)."""
    out = []
    for ratio, margin in AIMS.items():
        best = [r for r in rows if r["R"] == ratio and r["best_dynamic_by_val"]]
        if not best or best[0]["best_baseline"] is None:
            continue
        b = best[0]
        delta, p = b["delta_vs_best"], b["p_vs_best_baseline"]
        acc_met = delta >= margin and p is not None and p < ALPHA
        dep_met = (b["p90_p10"] or 0) >= AIM_P90_P10 and b["class_spread"] >= AIM_CLASS_SPREAD
        high = b["delta_ci95_high"]
        ci = "–" if high is None else f"[{b['delta_ci95_low']:+.2f}, {high:+.2f}]"
        verdict = ("met" if acc_met else f"missed by {margin - delta:.2f} pt" if delta < margin else
                   "margin ok, p >= 0.05")
        out.append({"R": ratio, "best_dynamic (val)": b["method"], "vs": b["best_baseline"],
                    "delta_pt": round(delta, 3), "aim_pt": margin, "p": None if p is None else float(f"{p:.4g}"),
                    "delta_ci95": ci,
                    "aim_ruled_out": "–" if high is None else "yes" if high < margin else "no",
                    "accuracy_aim": verdict, "p90_p10": round(b["p90_p10"] or 0, 3),
                    "class_spread": round(b["class_spread"], 3), "dependence_aim": "met" if dep_met else "missed",
                    "n_seeds": b["n_seeds"], "headline_valid": b["headline_valid"]})
    return out


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy (mean +- std over seeds) against the FLOPs ratio reached, one line per method; beside it,
    against the measured batch-1 speedup over dense (median over the timed seeds) where points were timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any(r.get("speedup_b1") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7.5, 4.8), squeeze=False)
    panels = [("flops_ratio", "mean FLOPs / dense FLOPs (test, gates included)", True)]
    if timed:
        panels.append(("speedup_b1", "measured speedup over BN-folded dense, batch 1 (compiled)", False))
    dense = [r for r in rows if r["kind"] == "dense"]
    references = [r for r in rows if r["kind"] == "reference"]
    styles = {"static": "s--", "thin": "^--", "slimmable": "v--", "reduce": "D--", "dynamic": "o-"}
    for ax, (key, label, log) in zip(axes[0], panels, strict=True):
        if dense:
            ax.axhline(dense[0]["acc_mean"], color="gray", ls=":", label=f"dense ({dense[0]['acc_mean']:.2f})")
        for ref in references:
            ax.axhline(ref["acc_mean"], color="black", ls="-.", lw=0.8,
                       label=f"{ref['method']} ({ref['acc_mean']:.2f}, reference)")
        for method in sorted({r["method"] for r in rows if r["kind"] not in DENSE_KINDS}):
            pts = sorted((r for r in rows if r["method"] == method and r.get(key) is not None), key=lambda r: r[key])
            if pts:
                ax.errorbar([r[key] for r in pts], [r["acc_mean"] for r in pts], yerr=[r["acc_std"] or 0 for r in pts],
                            fmt=styles[pts[0]["kind"]], capsize=3, label=method, alpha=0.85)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)
    return path


def header(cfg: BenchConfig, runs: list[dict[str, Any]]) -> str:
    """The protocol, device and rules in words: what a reader needs to trust or doubt the table."""
    devices = sorted({r["device"] for r in runs}) or ["(no runs yet)"]
    kd = f"KD weight {cfg.kd_weight}, temperature {cfg.kd_temperature}"
    free = [a.name for a in cfg.arms if a.training_free]
    optim = (f"SGD nesterov, per-epoch cosine; lr {cfg.lr} from scratch" if cfg.optimizer == "sgd" else
             f"{cfg.optimizer}, per-epoch cosine, weight decay {cfg.weight_decay}; lr {cfg.lr} from scratch")
    return "\n".join([
        f"# Fair benchmark: {cfg.backbone}, protocol `{cfg.protocol}`", "",
        *( [cfg.description, ""] if cfg.description else []),
        f"- **Data:** {cfg.data.describe()}; batch {cfg.data.batch_size}.",
        f"- **Budget:** dense model {cfg.dense_epochs} epochs (its own seeds); pruned and warm-started arms "
        f"{cfg.dense_epochs} + {cfg.extra_epochs} epochs; from-scratch arms (thin, slimmable, dynamic from scratch) "
        f"{cfg.total_epochs} epochs. {optim}, {cfg.finetune_lr} after a warm start"
        f"{f'; gradients clipped at norm {cfg.gradient_clip}' if cfg.gradient_clip else ''}."
        + (f" Dense references ({', '.join(f'{e} epochs' for e in cfg.dense_reference)}, from scratch, their own "
           "seeds) show how far the dense model is from convergence; no arm starts or distils from them and they are "
           "not baselines (they train longer than the budget)." if cfg.dense_reference else "")
        + (f" Training-free token reductions ({', '.join(free)}) are the dense model reduced as it is "
           f"({cfg.dense_epochs} epochs), each beside its fine-tuned twin at the full budget." if free else ""),
        (f"- **Teacher:** `+kd` rows distil from the frozen dense model of the same seed ({kd}); every arm that can "
         "distil runs with and without it. Slimmable distils in place from its largest width only."
         if any(True in a.kd for a in cfg.arms) else "- **Teacher:** none: no arm distils (the same for every arm)."),
        f"- **FLOPs:** every row within +-{100 * cfg.flops_tolerance:g}% (relative) of 1/R, checked per run "
        "(dynamic: on the validation mean); `flops_ratio` is the test mean with the gates' own FLOPs.",
        "- **Selection:** widths, depths, prune fractions and token schedules come from FLOPs alone; no checkpoint "
        "selection (the last epoch is the model); the test set is evaluated once per run; the best dynamic recipe "
        f"per R is chosen on validation accuracy (`best_dynamic_by_val`) among the recipes with >= {cfg.min_seeds} "
        "seeds on budget; the strongest baseline per R is the one "
        "with the highest test mean (conservative: it can only make dynamic look worse).",
        f"- **Statistics:** seeds {list(cfg.seeds)}; mean +- std (sample) over seeds; `p90_p10` is the ratio of "
        "the mean p90 and p10 per-input FLOPs; `p_vs_best_baseline`: two-sided Welch t-test "
        "(scipy.stats.ttest_ind, equal_var=False) against the strongest baseline, with the 95% confidence interval "
        "of the difference (`95% CI`; in the aims table, `aim_ruled_out` when its upper end is below the aimed "
        "margin); `win` needs a higher mean and "
        f"p < {ALPHA}; `headline_valid` needs >= {cfg.min_seeds} seeds on both sides. Wins are bold only when "
        "headline-valid.",
        f"- **Device:** {'; '.join(devices)}.",
        "- **Speed:** `speedup b1` / `b64`: the trained network compiled for inference (BN folded; dynamic: only "
        "the kept compute runs; token reductions: the plain modules they are, uncompiled) against the BN-folded "
        "dense model of its seed, each in the path and memory layout its dispatch plan timed faster on those "
        "images, on the same test images, interleaved rounds, median over the timed seeds "
        "(`dynprune bench --latency`); `(of theory)` divides by 1 / FLOPs ratio. Timed on the device of the runs' "
        f"`latency_device` column in the csv, at {cfg.threads} thread(s); each run's `latency.json` records the "
        "code version, the load average and both plans.", ""])


def _cell(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _note(row: dict[str, Any]) -> str:
    """Says in words when a dynamic row's masks barely depend on the input."""
    if row["kind"] != "dynamic":
        return ""
    if (row["p90_p10"] or 1.0) < STATIC_P90_P10 or row["dynamic_frac"] < STATIC_DYNAMIC_FRAC:
        return "masks ~static: static pruning with extra steps"
    return ""


def markdown_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The md view of the table: accuracy as mean +- std, the method bold only for a headline-valid win
    (the csv keeps every column)."""
    out = []
    for r in rows:
        name = f"**{r['method']}**" if r["win"] and r["headline_valid"] else r["method"]
        if r["best_dynamic_by_val"]:
            name += " (best dyn., val)"
        out.append({
            "R": f"{r['R']:g}", "method": name, "n": str(r["n_seeds"]),
            "test acc": f"{r['acc_mean']:.2f} ± {_cell(r['acc_std'])}", "val acc": f"{r['val_acc_mean']:.2f}",
            "FLOPs ratio": f"{r['flops_ratio']:.4f}", "achieved R": f"{r['achieved_R']:.2f}",
            "p90/p10": _cell(r["p90_p10"], ".3f"), "class spread": _cell(r["class_spread"], ".3f"),
            "dyn. units": _cell(r["dynamic_frac"], ".3f"),
            "speedup b1 (of theory)": "–" if r["speedup_b1"] is None else
            f"{r['speedup_b1']:.2f}x ({r['of_theory_b1']:.2f})", "speedup b64": _cell(r["speedup_b64"], ".2f"),
            "vs best baseline": r["best_baseline"] or "–",
            "Δ pt": _cell(r["delta_vs_best"], "+.2f"),
            "95% CI": "–" if r["delta_ci95_low"] is None else
            f"[{r['delta_ci95_low']:+.2f}, {r['delta_ci95_high']:+.2f}]",
            "p (Welch)": _cell(r["p_vs_best_baseline"], ".3g"),
            "win": "yes" if r["win"] else "", "headline": "yes" if r["headline_valid"] else "no",
            "epochs (own/total)": f"{r['epochs']}/{r['total_epochs']}", "note": _note(r)})
    return out


def write_outputs(cfg: BenchConfig, root: str | Path, out: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Check the finished runs, then write ``<stem>.{csv,md,png}`` and ``<stem>_runs.jsonl`` under ``out``."""
    root, out = Path(root), Path(out)
    runs = collect_runs(cfg, root)
    check_runs(cfg, runs)
    rows = aggregate(cfg, runs)
    stem = out / cfg.stem()
    atomic_write(f"{stem}_runs.jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in runs))
    write_csv(f"{stem}.csv", rows)
    parts = [header(cfg, runs), to_markdown(markdown_rows(rows))]
    aim_rows = aims(rows)
    if aim_rows:
        parts += ["\n## Aims (DESIGN.md)\n", to_markdown(aim_rows)]
    rejected = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{REJECTED}"))]
    if rejected:
        parts += ["\n## Rejected runs (fairness violations, not in the table)\n",
                  "\n".join(f"- `{r['point']}`: {r['reason']}" for r in rejected) + "\n"]
    parts.append(f"\nRuns: `{stem.name}_runs.jsonl`. Reproduce or resume: "
                 f"`dynprune bench {cfg.path} --root {root.parent}`.\n")
    atomic_write(f"{stem}.md", lambda f: f.write("\n".join(parts)))
    if rows:
        title = f"{cfg.backbone}, {cfg.protocol}: accuracy vs FLOPs and vs measured speed (mean +- std)"
        pareto_plot(rows, Path(f"{stem}.png"), title)
    return stem, rows
