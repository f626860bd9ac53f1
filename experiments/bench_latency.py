"""Measured CPU latency against theoretical speedup: dense, masked, compiled dynamic, static and uniform nets.

For each model (ResNet-20 at 28x28 and 32x32, VGG-11-BN at 32x32) the forms are
- ``dense``: BN folded (``compile_for_inference`` of the unpruned net): the baseline of every speedup;
- ``masked <granularity>``: the gated model as training runs it (all compute, then the mask);
- ``compiled <granularity>``: ``compile_for_inference`` of the gated model: only the kept compute runs;
- ``static_l1``: L1-filter pruned to the same FLOPs and physically thinned, BN folded;
- ``uniform``: the net built with ``width_mult`` at the same FLOPs, BN folded: the ceiling.
Untrained gates get a calibrated last-layer bias so each unit is on for a chosen fraction of inputs
(always-on, always-off and input-dependent units, see ``calibrate_gates``); the mean keep rate is bisected
until the mean effective FLOPs reach dense / ``--ratio``. Times are medians of ``torch.utils.benchmark``
``blocked_autorange`` after a warm-up; each configuration is measured ``--repeats`` times interleaved
across forms and the fastest median is kept (a load spike on a shared machine hits all forms alike).

    python experiments/bench_latency.py                # the full table (a few minutes on 2 cores)
    python experiments/bench_latency.py --smoke        # tiny sizes, 2 repeats (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark

import dynprune as dp
from dynprune.flops import count_flops
from dynprune.io import atomic_write, save_figure, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.runtime.blocks import SubBatchBlock
from dynprune.runtime.channels import ThinLayer

RESULTS = Path(__file__).parent / "results"
MODELS: dict[str, dict[str, Any]] = {
    "resnet20_28": dict(backbone="resnet20", in_chans=1, input_size=28),
    "resnet20_32": dict(backbone="resnet20", in_chans=3, input_size=32),
    "vgg11_32": dict(backbone="vgg11", in_chans=3, input_size=32),
}
SMOKE_MODELS: dict[str, dict[str, Any]] = {
    "resnet20_8": dict(backbone="resnet20", in_chans=1, input_size=8, width_mult=0.5),
}
GRANULARITIES = ("channel", "block", "width")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures and how long it may take."""

    ratio: float = 2.0
    dynamic: float = 0.3
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    threads: tuple[int, ...] = (1,)
    repeats: int = 2
    min_run_time: float = 0.05
    flops_tol: float = 1e-2
    calib_size: int = 32
    bisect_steps: int = 8
    seed: int = 0


SMOKE = Settings(batch_sizes=(1, 4), repeats=2, min_run_time=0.0, flops_tol=0.1, calib_size=16, bisect_steps=6)


@dataclass
class Form:
    """One way of running a model: a callable on a batch, its mean effective FLOPs per input."""

    name: str
    run: Callable[[Tensor], Tensor]
    flops: float
    module: nn.Module


def unit_probabilities(units: int, keep: float, dynamic: float, gen: torch.Generator) -> Tensor:
    """(units,) on-probabilities with mean ``keep``: a share ``dynamic`` of units at 0.5 (input-dependent),
    the rest always on (1) or always off (0), placed at random; dynamic units shrink if keep is extreme."""
    n_dyn = min(round(dynamic * units), round(2 * min(keep, 1 - keep) * units))
    n_on = max(0, min(units - n_dyn, round(keep * units - 0.5 * n_dyn)))
    probs = torch.zeros(units)
    probs[:n_on] = 1.0
    probs[n_on : n_on + n_dyn] = 0.5
    return probs[torch.randperm(units, generator=gen)]


@torch.no_grad()
def calibrate_gates(model: nn.Module, inputs: Tensor, probs: dict[str, Tensor]) -> Tensor:
    """Set each gate's last bias (in call order, in one pass over ``inputs``) so that unit u of site s is on
    for a fraction ``probs[s][u]`` of the inputs; returns the effective FLOPs ratio per input (N,)."""
    info = dp.gating_info(model)
    handles = []
    for name, gate in dp.gates_of(model).items():
        def hook(gate: nn.Module, args: tuple, p: Tensor = probs[name]) -> None:
            raw = gate.logits(args[0]) - gate.fc2.bias
            thresholds = torch.quantile(raw, (1 - p).clamp(0, 1), dim=0).diagonal()
            bias = torch.where(p >= 1, 1e4, torch.where(p <= 0, -1e4, -thresholds))
            gate.fc2.bias.copy_(bias)

        handles.append(gate.register_forward_pre_hook(hook))
    try:
        model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    return info.flops.ratio(dp.collect_masks(model))


def gated_at_ratio(
    net: nn.Module, granularity: str, ratio: float, inputs: Tensor, dynamic: float, seed: int = 0, steps: int = 10,
) -> tuple[nn.Module, float]:
    """A sigmoid-gated copy of ``net`` whose mean effective FLOPs on ``inputs`` are dense / ``ratio`` (``steps``
    of bisection on the mean keep rate); returns (model, mean FLOPs ratio reached)."""
    model = dp.gate_model(copy.deepcopy(net), gate="sigmoid", granularity=granularity).eval()
    units = {name: site.units for name, site in dp.gating_info(model).sites.items()}
    lo, hi, reached = 0.0, 1.0, 1.0
    for _ in range(steps):
        keep = (lo + hi) / 2
        gen = torch.Generator().manual_seed(seed)
        share = dynamic if granularity == "channel" else 1.0
        probs = {name: unit_probabilities(n, keep, share, gen) if n > 1 else torch.tensor([keep])
                 for name, n in units.items()}
        reached = float(calibrate_gates(model, inputs, probs).mean())
        lo, hi = (lo, keep) if reached > 1 / ratio else (keep, hi)
    return model, reached


def uniform_at_ratio(spec: dict[str, Any], ratio: float) -> nn.Module:
    """The backbone built with the ``width_mult`` (step 1/64, bisected) whose FLOPs are closest to dense / ``ratio``."""
    shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
    base = spec.get("width_mult", 1.0)
    target = count_flops(build(spec), shape)[0] / ratio
    flops = {64: int(target * ratio)}

    def at(step: int) -> int:
        if step not in flops:
            flops[step] = count_flops(build(spec, base * step / 64), shape)[0]
        return flops[step]

    lo, hi = 1, 64  # FLOPs grow with the width: find the smallest step at or above the target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) >= target else (mid, hi)
    step = min((lo, hi), key=lambda s: abs(at(s) - target))
    return build(spec, base * step / 64)


def static_at_ratio(net: nn.Module, ratio: float, shape: tuple[int, ...], tol: float) -> nn.Module:
    """L1-filter pruned to dense / ``ratio`` FLOPs (channel fraction bisected to ``tol``) and physically
    thinned; the weights are untrained (only speed matters here)."""
    fraction = dp.static.fraction_for_flops(net, ratio, shape, tol=tol)
    return dp.static.remove_channels(dp.static.prune_model(copy.deepcopy(net), "l1_structured", fraction))


def build(spec: dict[str, Any], width_mult: float | None = None) -> nn.Module:
    """The backbone of ``spec``, eval mode, BN statistics randomised (folding must not be a no-op)."""
    kwargs = {k: v for k, v in spec.items() if k != "backbone"}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    net = dp.backbones.create(spec["backbone"], **kwargs).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def forms_of(spec: dict[str, Any], cfg: Settings) -> tuple[list[Form], float]:
    """Every form of one model; returns (forms, dense FLOPs per input)."""
    ratio = cfg.ratio
    shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
    net = build(spec)
    dense_flops = count_flops(net, shape)[0]
    forms = [Form("dense", compile_for_inference(net), dense_flops, net)]
    for granularity in GRANULARITIES:
        try:
            gated, reached = gated_at_ratio(net, granularity, ratio, torch.randn(cfg.calib_size, *shape), cfg.dynamic,
                                             cfg.seed, cfg.bisect_steps)
        except ValueError as err:  # e.g. no residual blocks to gate in VGG
            print(f"  skip {granularity}: {err}")
            continue
        flops = reached * dense_flops
        forms.append(Form(f"masked {granularity}", gated, flops, gated))
        compiled = compile_for_inference(gated)
        forms.append(Form(f"compiled {granularity}", compiled, flops, compiled))
    static = static_at_ratio(net, ratio, shape, cfg.flops_tol)
    forms.append(Form("static_l1", compile_for_inference(static, shape), count_flops(static, shape)[0], static))
    uniform = uniform_at_ratio(spec, ratio)
    forms.append(Form("uniform", compile_for_inference(uniform), count_flops(uniform, shape)[0], uniform))
    return forms, dense_flops


def measure(form: Form, batches: Sequence[Tensor], threads: int, min_run_time: float) -> float:
    """Median seconds per batch over a cycle of ``batches`` (per-input decisions differ between them)."""
    cycle = itertools.cycle(batches)
    timer = benchmark.Timer("with torch.inference_mode(): run(next(cycle))",
                            globals={"run": form.run, "cycle": cycle, "torch": torch}, num_threads=threads)
    timer.timeit(len(batches))  # warm-up: one pass over the batches
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def gate_share(form: Form, batch: Tensor, threads: int, min_run_time: float) -> float:
    """Seconds a compiled form spends deciding per batch: every gate call of one forward pass (pooling and
    scattering its input included) is recorded, then re-run alone and timed like the whole model."""
    calls: list[tuple[Callable[..., Tensor], tuple[Any, ...]]] = []

    def record(module: nn.Module, args: tuple) -> None:
        if isinstance(module, ThinLayer) and module.gate is not None:
            calls.append((module.decide, (args[0], module.input_columns())))
        elif isinstance(module, SubBatchBlock):
            calls.append((module.decisions, (args[0],)))

    handles = [m.register_forward_pre_hook(record) for m in form.module.modules()
               if isinstance(m, (ThinLayer, SubBatchBlock))]
    try:
        form.run(batch)
    finally:
        for h in handles:
            h.remove()
    timer = benchmark.Timer("with torch.inference_mode():\n    for f, a in calls: f(*a)",
                            globals={"calls": calls, "torch": torch}, num_threads=threads)
    timer.timeit(2)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def profile_summary(form: Form, batch: Tensor, threads: int, iters: int = 10) -> str:
    """torch.profiler table of one form (top ops by self CPU time)."""
    torch.set_num_threads(threads)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            form.run(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def bench(
    models: dict[str, dict[str, Any]], cfg: Settings, done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """All rows of the table and the profile text of the worst dynamic row; ``done(rows)`` after each model."""
    rows: list[dict[str, Any]] = []
    worst: tuple[float, Form, Tensor, int, str] | None = None
    for model_name, spec in models.items():
        torch.manual_seed(cfg.seed)
        shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
        print(f"{model_name}: building forms at {cfg.ratio}x fewer FLOPs")
        forms, dense_flops = forms_of(spec, cfg)
        for batch_size, n_threads in itertools.product(cfg.batch_sizes, cfg.threads):
            batches = [torch.randn(batch_size, *shape) for _ in range(max(1, 8 // batch_size))]
            best = {f.name: float("inf") for f in forms}
            for _ in range(cfg.repeats):
                for f in forms:
                    best[f.name] = min(best[f.name], measure(f, batches, n_threads, cfg.min_run_time))
            ceiling = best["dense"] / best["uniform"] / (dense_flops / forms[-1].flops)
            for f in forms:
                theoretical = dense_flops / f.flops
                achieved = best["dense"] / best[f.name]
                row = {"model": model_name, "form": f.name, "batch": batch_size, "threads": n_threads,
                       "latency_ms": 1e3 * best[f.name], "images_per_s": batch_size / best[f.name],
                       "theoretical": theoretical, "achieved": achieved, "ratio": achieved / theoretical,
                       "ceiling_ratio": ceiling, "of_ceiling": achieved / theoretical / ceiling,
                       "gate_share": ""}
                if f.name.startswith("compiled"):
                    row["gate_share"] = gate_share(f, batches[0], n_threads, cfg.min_run_time) / best[f.name]
                    if worst is None or row["ratio"] < worst[0]:
                        worst = (row["ratio"], f, batches[0], n_threads,
                                 f"{model_name} {f.name} batch {batch_size} threads {n_threads}")
                rows.append(row)
            print(to_markdown([r for r in rows if r["model"] == model_name and r["batch"] == batch_size
                               and r["threads"] == n_threads]))
        if done is not None:
            done(rows)
    profile = ""
    if worst is not None:
        profile = f"# Worst compiled row: {worst[4]} (achieved/theoretical {worst[0]:.3f})\n\n"
        profile += profile_summary(worst[1], worst[2], worst[3])
    return rows, profile


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """achieved / theoretical speedup per form against batch size, one panel per model and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["threads"]) for r in rows})
    forms = list(dict.fromkeys(r["form"] for r in rows if r["form"] != "dense"))
    colors = dict(zip(forms, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (model, threads) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if r["model"] == model and r["threads"] == threads]
        for form in forms:
            pts = sorted((r["batch"], r["ratio"]) for r in sub if r["form"] == form)
            if pts:
                style = "--" if form.startswith("masked") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colors[form], label=form)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.5)
        ax.set_title(f"{model}, {threads} thread(s)", fontsize=9)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("achieved / theoretical speedup")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def machine() -> str:
    """CPU model, core count, torch version and load average, for the result files."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{cpu}, nproc={os.cpu_count()}, torch {torch.__version__}, load average {load}"


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """achieved / theoretical per form, one row per model, threads and batch size (the ceiling: ``uniform``)."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in rows:
        if r["form"] != "dense":
            key = (r["model"], r["threads"], r["batch"])
            out.setdefault(key, {"model": key[0], "threads": key[1], "batch": key[2]})[r["form"]] = r["ratio"]
    return list(out.values())


def report(rows: Sequence[dict[str, Any]], cfg: Settings, command: str, start: str) -> str:
    """The markdown result file: command, machine, settings, summary and full table."""
    return (f"# Measured latency vs theoretical speedup at {cfg.ratio:g}x fewer FLOPs\n\n"
            f"Command: `{command}`\n\nMachine: {start} at the start; {machine()} at the end. Threads: "
            f"{', '.join(map(str, cfg.threads))} (`torch.utils.benchmark.Timer(num_threads=...)`).\n\n"
            f"Timing: median of `blocked_autorange(min_run_time={cfg.min_run_time})` after a warm-up, fastest of "
            f"{cfg.repeats} interleaved repeats; inputs cycle through {{8 // batch}} random batches. Gates: sigmoid, "
            f"untrained, last bias calibrated on {cfg.calib_size} random inputs so that per layer a share "
            f"{cfg.dynamic:g} of channels is input-dependent (on for half the inputs), the rest always on/off "
            f"(blocks: every block input-dependent); mean keep rate bisected to the target FLOPs. Dense, static and "
            f"uniform nets are BN-folded; `gate_share` = time of the gate calls alone / time of the compiled model."
            f"\n\n## achieved / theoretical speedup (uniform = the static ceiling)\n\n{to_markdown(summary(rows))}"
            f"\n## All rows\n\n{to_markdown(rows)}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 repeats, no minimum run time")
    parser.add_argument("--ratio", type=float, default=2.0, help="target dense / mean effective FLOPs")
    parser.add_argument("--dynamic", type=float, default=0.3, help="share of input-dependent channels per layer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=2, help="interleaved measurements, fastest median kept")
    parser.add_argument("--min-run-time", type=float, default=0.05, help="seconds per blocked_autorange")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_latency")
    args = parser.parse_args(argv)
    if args.smoke:
        models, cfg = SMOKE_MODELS, replace(SMOKE, ratio=args.ratio, dynamic=args.dynamic)
    else:
        models = {name: MODELS[name] for name in args.models}
        cfg = Settings(args.ratio, args.dynamic, tuple(args.batch_sizes), tuple(args.threads), args.repeats,
                       args.min_run_time)
    start = machine()
    command = "python experiments/bench_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(rows: list[dict[str, Any]]) -> None:
        write_csv(args.out.with_name(args.out.name + ".csv"), rows)
        atomic_write(args.out.with_name(args.out.name + ".md"), lambda f: f.write(report(rows, cfg, command, start)))

    rows, profile = bench(models, cfg, write)
    plot(rows, args.out.with_name(args.out.name + ".png"))
    atomic_write(args.out.with_name(args.out.name + "_profile.txt"), lambda f: f.write(profile))
    print(to_markdown(summary(rows)))
    print(profile)
    return rows


if __name__ == "__main__":
    main()
