"""Char-GPT neuron gating on Shakespeare: validation nats/char and KV-cache decode speed, dense vs learned and
training-free threshold gates at 50% and 70% MLP sparsity.

Arms (per seed, ``--seeds``; a short CPU budget, stated in the output):
- ``dense``: the char GPT trained ``--steps`` steps (AdamW, warm-up + cosine, CharLM's recipe);
- ``threshold s``: that model with neuron gates calibrated by ``calibrate_thresholds`` on ``--calib`` training
  windows to sparsity s (training-free: TEAL / CATS style), its predictor of rank dim / 8 (the gate width of the
  learned arms); ``threshold exact s``: rank dim, the exact fc1 pre-activations (CATS's rule; the predictor then
  costs more than fc1 itself: a quality bound, not a fast arm);
- ``dense +F``: the dense model trained ``--finetune`` more steps at a constant small learning rate (the dense
  reference at the learned arms' total budget);
- ``learned s``: the threshold-s model fine-tuned ``--finetune`` steps with its gates (sigmoid family,
  straight-through) and the weights, loss = CE + ``--lam`` x sum over MLPs of (kept fraction - (1 - s))^2.
Validation: the same ``--val-batches`` windows of the held-out plays for every arm, gates deciding hard.
Decode: greedy ``generate`` with a KV cache from an 8-character prompt to the full context, batch 1 and 8; the
gated arms run ``compile_for_inference`` (each token computes only its own kept fc1 rows / fc2 columns at batch 1,
the union over the batch at 8). Times are interleaved across arms and repeated; medians, 1 thread, and the
``uptime`` load average beside them. ``ceiling`` is the dense/gated FLOPs ratio of a full-context forward pass
(MLPs at the measured validation sparsity, gates included): the speedup if time followed FLOPs.

    python experiments/bench_gpt.py --wait-quiet 1.3  # 3 seeds, ~30 min of training on one core; times when quiet
    python experiments/bench_gpt.py --smoke         # seconds: tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynprune as dp
from dynprune.backbones import create_language_model
from dynprune.bench.table import welch_p
from dynprune.granularity.neuron import calibrate_thresholds
from dynprune.io import atomic_write, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.runtime.neurons import NeuronOut
from dynprune.text import TextDataModule

RESULTS = Path(__file__).parent / "results"


def windows(data: TextDataModule, split: str, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random windows (x, y), each (count, block_size), of split ``split``."""
    ds = data.datasets[split]
    idx = torch.randint(len(ds), (count,), generator=gen)
    xs, ys = zip(*(ds[int(i)] for i in idx), strict=True)
    return torch.stack(xs), torch.stack(ys)


def train(model: nn.Module, data: TextDataModule, steps: int, batch: int, lr: float, seed: int,
          sparsity: float | None = None, lam: float = 0.0, schedule: bool = True) -> list[float]:
    """AdamW steps on random training windows (warm-up + cosine when ``schedule``); with ``sparsity``, the gates
    train too and each MLP's kept fraction is pulled to 1 - sparsity. Returns the last losses."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.99))
    warmup = min(100, steps // 10)
    losses = []
    model.train()
    for step in range(steps):
        if schedule:
            factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (
                1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * factor
        x, y = windows(data, "train", batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if sparsity is not None:
            keep = [m.mean() for m in dp.collect_masks(model).values()]
            loss = loss + lam * sum((k - (1 - sparsity)) ** 2 for k in keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses[-20:]


@torch.no_grad()
def evaluate(model: nn.Module, val: tuple[Tensor, Tensor], batch: int) -> tuple[float, float | None]:
    """(nats per character, mean kept fraction of the MLP units or None) over the validation windows."""
    model.eval()
    total, keeps = 0.0, []
    x, y = val
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum"))
        masks = dp.collect_masks(model) if hasattr(model, "dynprune") else {}
        if masks:
            keeps.append(float(torch.stack([m.float().mean() for m in masks.values()]).mean()))
    return total / y.numel(), statistics.fmean(keeps) if keeps else None


def decode_flops_ratio(model: nn.Module, keep: float | None) -> float:
    """FLOPs of a full-context forward pass of the gated model over the dense one: MLPs at ``keep``, gates
    included."""
    if keep is None:
        return 1.0
    info = dp.gating_info(model)
    mlp = sum(lay.dense for lay in info.flops.layers if ".mlp." in lay.name)
    dense = info.flops.dense_total
    return (dense - mlp * (1 - keep) + info.flops.gate_flops) / dense


def uptime() -> str:
    """The load averages as ``uptime`` prints them."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def time_decode(arms: dict[str, nn.Module], prompt: Tensor, new: int, batches: tuple[int, ...],
                repeats: int) -> dict[tuple[str, int], list[float]]:
    """Seconds per greedy generate call, per (arm, batch), arms interleaved within each repeat."""
    times: dict[tuple[str, int], list[float]] = {(a, b): [] for a in arms for b in batches}
    for rep in range(repeats + 1):  # the first round warms up
        for b in batches:
            for name, net in arms.items():
                ids = prompt[:b]
                start = time.perf_counter()
                with torch.inference_mode():
                    net.generate(ids, new, temperature=0)
                if rep:
                    times[name, b].append(time.perf_counter() - start)
    return times


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's GPT aims, met or not, from the rows averaged over seeds: 50% MLP sparsity at <= 3%
    validation-loss increase, and >= 1.4x decode speed at batch 1."""
    lines = []
    for row in rows:
        if row["arm"].startswith(("learned", "threshold")) and row["mlp_keep"] <= 0.5 + 0.02:
            met = "met" if row["loss_increase"] <= 0.03 else "not met"
            lines.append(f"- {row['arm']}: {1 - row['mlp_keep']:.0%} MLP sparsity at {row['loss_increase']:+.2%} "
                         f"validation loss: the <= 3% aim is {met}.")
    fastest = max((r for r in rows if r.get("speedup_b1") is not None and r["arm"] != "dense"),
                  key=lambda r: r["speedup_b1"], default=None)
    if fastest is not None:
        met = "met" if fastest["speedup_b1"] >= 1.4 else "not met"
        lines.append(f"- Decode at batch 1: the fastest gated arm ({fastest['arm']}) runs {fastest['speedup_b1']:.2f}x "
                     f"dense (ceiling {fastest['ceiling']:.2f}x): the >= 1.4x aim is {met}.")
    return lines


def wait_quiet(load: float, limit_s: float = 7200.0) -> None:
    """Block until the 1-minute load average is under ``load`` (other jobs finished), at most ``limit_s``."""
    start = time.time()
    while os.getloadavg()[0] >= load:
        if time.time() - start > limit_s:
            raise RuntimeError(f"the load average stayed >= {load} for {limit_s:.0f} s: not timing on a busy machine")
        time.sleep(15)


def train_seed(args: argparse.Namespace, seed: int) -> tuple[list[dict[str, Any]], dict[str, nn.Module], Tensor]:
    """Train and evaluate every arm of one seed: (rows, models, validation windows)."""
    torch.manual_seed(seed)
    data = TextDataModule(block_size=args.block, batch_size=args.batch, seed=seed)
    data.setup()
    gen = torch.Generator().manual_seed(seed + 1)
    val = windows(data, "val", args.val_batches * args.batch, gen)
    calib = windows(data, "train", args.calib, gen)[0]
    example = calib[:1]

    dense = create_language_model("char_gpt", data.vocab_size, args.block, dim=args.dim, depth=args.depth,
                                  heads=args.heads)
    models: dict[str, nn.Module] = {"dense": dense}
    if not args.untrained:
        train(dense, data, args.steps, args.batch, args.lr, seed)
        models[f"dense +{args.finetune}"] = dense_more = copy.deepcopy(dense)
        train(dense_more, data, args.finetune, args.batch, args.lr * 0.1, seed + 2, schedule=False)
    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    for s in args.sparsities:
        for label, width in (("threshold", {}), ("threshold exact", {"min_hidden": 2 * args.dim})):
            arm = dp.gate_model(copy.deepcopy(dense), gate="sigmoid", granularity="neuron", example=example, **width)
            calibrate_thresholds(arm, batches, s)
            models[f"{label} {s:.0%}"] = arm
        threshold = models[f"threshold {s:.0%}"]
        if args.untrained:
            continue
        learned = copy.deepcopy(threshold)
        train(learned, data, args.finetune, args.batch, args.lr * 0.1, seed + 2, sparsity=s, lam=args.lam,
              schedule=False)
        models[f"learned {s:.0%}"] = learned

    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        loss, keep = evaluate(model, val, args.batch)
        rows.append({"seed": seed, "arm": name, "val_nats_per_char": loss,
                     "mlp_keep": keep if keep is not None else 1.0,
                     "decode_flops_ratio": decode_flops_ratio(model, keep)})
    dense_loss = rows[0]["val_nats_per_char"]
    longer = next((r["val_nats_per_char"] for r in rows if r["arm"].startswith("dense +")), dense_loss)
    for row in rows:
        base = longer if row["arm"].startswith(("learned", "dense +")) else dense_loss
        row["loss_increase"] = row["val_nats_per_char"] / base - 1
        row["ceiling"] = 1 / row["decode_flops_ratio"]
    return rows, models, val[0]


def time_seed(rows: list[dict[str, Any]], models: dict[str, nn.Module], val_x: Tensor,
              args: argparse.Namespace) -> None:
    """Time one seed's arms' KV-cache decode (compiled, interleaved) and add the speed columns to ``rows``."""
    compiled = {name: (compile_for_inference(m).net if hasattr(m, "dynprune") else m.eval())
                for name, m in models.items() if not name.startswith("dense +")}
    prompt = val_x[:8, :8]
    new = args.block - prompt.shape[1]
    for name in [n for n, net in compiled.items() if any(isinstance(m, NeuronOut) for m in net.modules())]:
        gathered = copy.deepcopy(compiled[name])  # the same arm with fc2 as a gathered GEMM at one position too
        for m in gathered.modules():
            if isinstance(m, NeuronOut):
                m.bag_at_one_position = False
        compiled[f"{name}|fc2 gathered"] = gathered
    times = time_decode(compiled, prompt, new, (1, 8), args.repeats)
    for row in rows:
        for b in (1, 8):
            if (row["arm"], b) not in times:
                continue
            median = statistics.median(times[row["arm"], b])
            row[f"tok_s_b{b}"] = b * new / median
            row[f"speedup_b{b}"] = statistics.median(times["dense", b]) / median
        gathered = times.get((f"{row['arm']}|fc2 gathered", 1))
        row["speedup_b1_fc2_gathered"] = (statistics.median(times["dense", 1]) / statistics.median(gathered)
                                          if gathered else None)  # every row has the column (the table's header)


SPEED = ("tok_s_b1", "speedup_b1", "tok_s_b8", "speedup_b8", "speedup_b1_fc2_gathered")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm over the seeds: means (and the std of the validation loss), the learned arms' Welch p against
    the threshold arm and against ``dense +F`` (the same total steps) on the per-seed losses."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in arms}
    out = []
    for arm in arms:
        group = by_arm[arm]
        losses = [r["val_nats_per_char"] for r in group]
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(group), "val_nats_per_char": statistics.fmean(losses),
                               "val_std": statistics.stdev(losses) if len(losses) > 1 else None}
        for key in ("mlp_keep", "loss_increase", "decode_flops_ratio", "ceiling", *SPEED):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        out.append(row)
    longer = next((a for a in arms if a.startswith("dense +")), None)
    for row in out:
        row["p_vs_threshold"] = row["p_vs_dense_more"] = None
        if not row["arm"].startswith("learned "):
            continue
        mine = [r["val_nats_per_char"] for r in by_arm[row["arm"]]]
        threshold = by_arm.get(row["arm"].replace("learned", "threshold"))
        if threshold:
            row["p_vs_threshold"] = welch_p(mine, [r["val_nats_per_char"] for r in threshold])
        if longer:
            row["p_vs_dense_more"] = welch_p(mine, [r["val_nats_per_char"] for r in by_arm[longer]])
    return out


def keep_checks(rows: list[dict[str, Any]], sparsities: list[float]) -> list[str]:
    """Each gated arm's mean kept share of MLP units against its target (the fairness rule: within 3% relative)."""
    lines = []
    for s in sparsities:
        for row in rows:
            if row["arm"].endswith(f" {s:.0%}"):
                off = row["mlp_keep"] / (1 - s) - 1
                verdict = "within 3%" if abs(off) <= 0.03 else "OFF the +-3% rule"
                lines.append(f"- {row['arm']}: keeps {row['mlp_keep']:.4f} of the MLP units (target {1 - s:.2f}, "
                             f"{off:+.1%}): {verdict}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--finetune", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lam", type=float, default=20.0)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                        help="before timing, wait until the 1-minute load average is under LOAD")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--untrained", action="store_true",
                        help="speed only: random weights, dense and threshold arms (no training, no learned arms)")
    parser.add_argument("--out", default=str(RESULTS / "bench_gpt"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.depth, args.heads, args.block, args.batch = 32, 2, 2, 32, 8
        args.steps, args.finetune, args.calib, args.val_batches, args.repeats = 20, 5, 8, 2, 1
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    torch.set_num_threads(args.threads)
    started = time.time()
    trained = [train_seed(args, seed) for seed in args.seeds]
    train_minutes = (time.time() - started) / 60
    if args.wait_quiet is not None:
        wait_quiet(args.wait_quiet)
    load_before = uptime()
    for rows, models, val_x in trained:
        time_seed(rows, models, val_x, args)
    load_after = uptime()
    rows = [r for seed_rows, _, _ in trained for r in seed_rows]
    device = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {torch.get_num_threads()} thread(s)")
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), [{**r, "device": device} for r in rows])
    summary = aggregate(rows)
    val_windows = args.val_batches * args.batch
    budget = ("RANDOM WEIGHTS (--untrained): the speed columns only; the losses are those of an untrained model. "
              if args.untrained else "")
    budget += (f"char GPT dim {args.dim}, depth {args.depth}, {args.heads} heads, MLP hidden {4 * args.dim}, context "
              f"{args.block}; dense: {args.steps} steps x {args.batch} windows (lr {args.lr}, warm-up + cosine); "
              f"+{args.finetune} steps at lr {args.lr * 0.1} for `dense +{args.finetune}` and each learned arm "
              f"(lam {args.lam}); thresholds calibrated on {args.calib} training windows, site by site; seeds "
              f"{args.seeds} (each seed: its own dense training, data order, calibration and validation windows); "
              f"validation: {val_windows} windows of held-out plays ({val_windows * args.block} characters) per seed")
    text = "\n".join([
        "# Char-GPT neuron gating: validation loss and KV-cache decode speed",
        "",
        f"Command: `{' '.join(['python experiments/bench_gpt.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"Budget: {budget}. Training took {train_minutes:.1f} min.",
        "",
        f"Device: {device}. Load (`uptime`) before timing: `{load_before}`; after: `{load_after}`.",
        "",
        f"Decode: greedy, prompt 8 characters + {args.block - 8} new, KV cache; {args.repeats} interleaved "
        "repeats per seed, medians, then the mean over seeds; speedups are dense time / arm time in the same rounds "
        "(each seed's arms against its own dense model); `ceiling` = dense / gated FLOPs of a full-context forward "
        "(gates included); `speedup_b1_fc2_gathered`: the same arm with fc2 run as a gathered GEMM at batch 1 too "
        "(the runtime before the embedding bag). `loss_increase` is relative to `dense` (threshold arms) or to "
        f"`dense +{args.finetune}` (learned arms, equal total steps), per seed, then averaged. `p_vs_threshold` / "
        f"`p_vs_dense_more`: Welch t-test of the learned arm's per-seed losses against the threshold arm at its "
        f"sparsity / `dense +{args.finetune}`.",
        "",
        "## Mean over seeds",
        "",
        to_markdown(summary),
        "",
        *keep_checks(summary, args.sparsities),
        *verdicts(summary),
        "",
        "## Per seed",
        "",
        to_markdown(rows),
        "",
    ])
    atomic_write(out.with_suffix(".md"), lambda f: f.write(text))
    print(text)


if __name__ == "__main__":
    main()
