"""ViT on Fashion-MNIST at ~2x and ~3x fewer FLOPs, in one run: ToMe and EViT top-k off the shelf on a dense ViT,
EViT fine-tuned, learned token gating (``gate_model(..., granularity="token")``) fine-tuned as EViT is, and thinner
and shallower ViTs trained from scratch for the same epochs; accuracy, FLOPs (FlopCounterMode) and measured CPU
latency at batch 1 and 64 (interleaved, torch.utils.benchmark; token gating compiled) against the dense ViT.

Writes ``<out>/bench_vit.{csv,md}``; the md names the device, thread count, load average and exact command.

    nice -n 10 python experiments/bench_vit.py     # ~15-20 min on a loaded 2-core CPU (1 thread)
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.backbones.vit import VisionTransformer
from dynprune.baselines import apply_evit, apply_tome, pick_evit_keep_rate, pick_for_ratio, pick_tome_schedule
from dynprune.bench.run import code_version, device_name
from dynprune.data import FASHION_MNIST_DIR, FashionMNISTDataModule
from dynprune.flops import count_flops
from dynprune.granularity.token import keep_ratio_for
from dynprune.io import atomic_write, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.static import accuracy, finetune

SHAPE = (1, 28, 28)
DENSE = {"num_classes": 10, "in_chans": 1, "input_size": 28, "patch_size": 4, "dim": 96, "depth": 6, "heads": 3,
         "mlp_ratio": 4.0, "attention": "explicit"}
"""configs/fmnist_vit.yaml's backbone (``vit`` at its defaults), spelt out so thin and shallow variants change one
field."""


def train(build: Callable[[], nn.Module], dm: FashionMNISTDataModule, epochs: int, lr: float, seed: int,
          **task: float) -> nn.Module:
    """The model ``build()`` makes after seeding, trained as configs/fmnist_vit.yaml trains the dense ViT
    (GatedClassifier with gate null, Adam, weight decay 5e-5, cosine over the epochs, gradients clipped at norm 1);
    ``task``: further GatedClassifier arguments; returned in eval mode."""
    L.seed_everything(seed, verbose=False)
    model = build()
    model.input_shape = SHAPE
    return finetune(model, dm, epochs, lr, optimizer="adam", weight_decay=5e-5, trainer={"gradient_clip_val": 1.0},
                    **task)


LR_CHOICE = ("Adam's lr, chosen on the validation split (first 8000 training images, 1600 held out) by 300-step "
             "probes of the dense ViT at batch 32 (1 thread): 3e-4 57.4%%, 1e-3 48.4%%, 3e-3 33.9%% accuracy")


FLOPS_IMAGES = 256
"""Validation images whose mean FLOPs (compiled, batch 1) stand for an input-dependent arm's FLOPs."""
CALLS = {1: 8, 64: 1}
"""Forwards per timed measurement at each batch size (~30 ms and ~100 ms for the dense ViT on one core)."""


def token_arm(dense: VisionTransformer, dm: FashionMNISTDataModule, ratio: float, args: argparse.Namespace) -> dict:
    """Learned token gating (``gate_model(..., "sigmoid", granularity="token")``, DynamicViT's geometric keep
    schedule at its default blocks) warm-started from the dense ViT and fine-tuned as EViT is, its keep ratio the one
    whose schedule costs 1/``ratio`` of the dense FLOPs (``keep_ratio_for``). Measured on the compiled model."""
    def gated(keep_ratio: float = 0.7) -> nn.Module:
        return dp.gate_model(copy.deepcopy(dense), "sigmoid", granularity={"token": {"keep_ratio": keep_ratio}},
                             input_shape=SHAPE)

    rho = keep_ratio_for(gated(), ratio, args.tol)
    model = train(partial(gated, rho), dm, args.finetune_epochs, args.finetune_lr, args.seed,
                  gate_lr=args.token_gate_lr)
    sites = [name.split(".")[1] for name in model.dynprune.sites]
    compiled = compile_for_inference(model, SHAPE)
    images = dm.val_set.tensors[0][:FLOPS_IMAGES]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for image in images:
            compiled(image[None])
    setting = (f"keep_ratio {rho:.3f} at blocks [{', '.join(sites)}], lr {args.finetune_lr:g}, "
               f"gate lr {args.token_gate_lr:g}")
    return {"R": ratio, "arm": "token gating (learned)", "setting": setting,
            "epochs": args.epochs + args.finetune_epochs, "model": model, "timed": compiled,
            "flops_M": counter.get_total_flops() / len(images) / 1e6}


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int,
                        threads: int) -> dict[str, float]:
    """Seconds per eval forward of the batch ``x`` (N, *SHAPE) for each model: the minimum over ``rounds`` rounds, each
    timing every model in turn for ``calls`` forwards (torch.utils.benchmark). Interleaving exposes every model to
    the same load; on a machine shared by other jobs the least-disturbed round is the one that estimates the
    model, not the load."""
    timers = {name: benchmark.Timer("with torch.no_grad(): model(x)", globals={"model": model.eval(), "x": x,
                                                                                "torch": torch}, num_threads=threads)
              for name, model in models.items()}
    for timer in timers.values():
        timer.timeit(calls)  # warm-up
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = min(best[name], timer.timeit(calls).mean)
    return best


def loads() -> str:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0], help="target FLOPs reductions")
    parser.add_argument("--train-subset", type=int, default=8000, help="first N training images (0 = all 60k)")
    parser.add_argument("--val-size", type=int, default=1600, help="held out of the training subset")
    parser.add_argument("--test-subset", type=int, default=5000, help="first N test images (0 = all 10k)")
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1,
                        help="EViT fine-tuning epochs (thin and shallow arms train epochs + this, from scratch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help=LR_CHOICE)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--token-gate-lr", type=float, default=1e-3,
                        help="the token gates' lr (configs/fmnist_vit_token.yaml's); the ViT's is --finetune-lr")
    parser.add_argument("--tol", type=float, default=0.03, help="relative FLOPs tolerance of every arm at 1/R")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds (the minimum is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dm = FashionMNISTDataModule(args.data_dir, batch_size=args.batch_size, val_size=args.val_size,
                                train_subset=args.train_subset, test_subset=args.test_subset, seed=args.seed)
    total_epochs = args.epochs + args.finetune_epochs

    dense = train(partial(VisionTransformer, **DENSE), dm, args.epochs, args.lr, args.seed)
    dense_flops = count_flops(dense, SHAPE)[0]
    arms: list[dict] = [{"R": 1.0, "arm": "dense", "setting": "dim 96, depth 6", "epochs": args.epochs,
                         "model": dense}]

    def from_scratch(name: str, field: str, values: range, ratio: float) -> dict:
        """A ViT differing from the dense one in ``field``, FLOPs-matched to ``ratio``, trained ``total_epochs``."""
        build: Callable[[int], nn.Module] = lambda v: VisionTransformer(**{**DENSE, field: v})  # noqa: E731
        value, _ = pick_for_ratio(list(values), build, dense, SHAPE, ratio, args.tol)
        model = train(partial(build, value), dm, total_epochs, args.lr, args.seed)
        return {"R": ratio, "arm": name, "setting": f"{field} {value}", "epochs": total_epochs, "model": model}

    for ratio in args.ratios:
        schedule, _ = pick_tome_schedule(dense, ratio, args.tol)
        rate, _ = pick_evit_keep_rate(dense, ratio, tol=args.tol)
        evit_ft = train(partial(apply_evit, copy.deepcopy(dense), rate), dm, args.finetune_epochs, args.finetune_lr,
                        args.seed)
        evit_setting = f"keep {rate:.3f} at blocks {list(evit_ft.locations)}"
        arms += [
            {"R": ratio, "arm": "ToMe (off the shelf)", "setting": f"r per block {schedule}", "epochs": args.epochs,
             "model": apply_tome(dense, schedule)},
            {"R": ratio, "arm": "EViT (off the shelf)", "setting": evit_setting, "epochs": args.epochs,
             "model": apply_evit(dense, rate)},
            {"R": ratio, "arm": "EViT (fine-tuned)", "setting": f"{evit_setting}, lr {args.finetune_lr:g}",
             "epochs": total_epochs, "model": evit_ft},
            from_scratch("thinner ViT (scratch)", "dim", range(DENSE["heads"], DENSE["dim"], DENSE["heads"]), ratio),
            from_scratch("shallower ViT (scratch)", "depth", range(1, DENSE["depth"]), ratio),
            token_arm(dense, dm, ratio, args),
        ]
    train_seconds = time.perf_counter() - start

    for arm in arms:
        arm.setdefault("flops_M", count_flops(arm["model"], SHAPE)[0] / 1e6)
        arm["flops_ratio"] = dense_flops / 1e6 / arm["flops_M"]
        arm["val_acc"] = 100 * accuracy(arm["model"], dm, "val")
    test_start = time.perf_counter()
    for arm in arms:  # the test split, once per arm, after everything was fixed
        arm["test_acc"] = 100 * accuracy(arm["model"], dm, "test")
        arm["test_drop_pt"] = arms[0]["test_acc"] - arm["test_acc"]
    eval_seconds = time.perf_counter() - test_start

    load_before = loads()
    models = {str(i): arm.get("timed", arm["model"]) for i, arm in enumerate(arms)}
    for batch in (1, 64):
        seconds = interleaved_latency(models, dm.val_set.tensors[0][:batch], args.rounds, CALLS[batch], args.threads)
        for i, arm in enumerate(arms):
            arm[f"ms_b{batch}"] = 1e3 * seconds[str(i)]
            arm[f"speedup_b{batch}"] = seconds["0"] / seconds[str(i)]
            arm[f"speedup_b{batch}/flops_ratio"] = arm[f"speedup_b{batch}"] / arm["flops_ratio"]
    load_after = loads()
    noise = ", ".join(f"R={a['R']:g}: b1 {a['ms_b1'] / b['ms_b1']:.3f}, b64 {a['ms_b64'] / b['ms_b64']:.3f}"
                      for a, b in zip(arms, arms[1:], strict=False) if a["arm"] == "EViT (off the shelf)")

    rows = [{k: v for k, v in arm.items() if k not in ("model", "timed")} for arm in arms]
    rows.sort(key=lambda r: r["R"])
    stem = args.out / "bench_vit"
    write_csv(f"{stem}.csv", [{**r, "device": device_name("cpu")} for r in rows])
    command = shlex.join(["python", "experiments/bench_vit.py", *(sys.argv[1:] if argv is None else argv)])
    md = "\n".join([
        "# ViT on Fashion-MNIST: token reduction vs thinner/shallower ViTs at ~2x and ~3x fewer FLOPs",
        "",
        to_markdown(rows),
        f"- Device: {device_name('cpu')}; code {code_version()}; load average (1, 5, 15 min) {load_before} before "
        f"and {load_after} after the latency rounds (a shared machine: ratios, measured in one run, are the "
        "numbers to read).",
        f"- Data: the first {args.train_subset} Fashion-MNIST training images, {args.val_size} of them held out "
        f"for validation; the first {args.test_subset} test images. Seed {args.seed}, one seed: no row is a "
        "headline result and none is bolded.",
        f"- Dense: configs/fmnist_vit.yaml's ViT (patch 4, 49 tokens + CLS, dim 96, depth 6, 3 heads; "
        f"{dense_flops / 1e6:.1f} MFLOPs), {args.epochs} epochs at batch {args.batch_size}, Adam lr {args.lr:g}, "
        "weight decay 5e-5, cosine, clip 1: far from converged (a ViT learns slowly from scratch; the CPU was shared "
        "by several jobs), so every accuracy here is that of a short budget. ToMe and EViT (off the shelf) reuse "
        f"its weights training-free; EViT (fine-tuned) trains it {args.finetune_epochs} more epoch(s) with the "
        f"reduction in place at lr {args.finetune_lr:g}; the thinner "
        f"and shallower ViTs train from scratch for the same {total_epochs} epochs in total. No teacher for any arm.",
        f"- FLOPs: FlopCounterMode on one image of each arm's own forward (merging and top-k included); every "
        f"non-learned arm is within {100 * args.tol:g}% of 1/R (the pickers refuse otherwise). Token gating's FLOPs "
        f"are input-dependent: the mean over {FLOPS_IMAGES} validation images of its compiled model at batch 1, gates "
        "included; its keep ratio (DynamicViT's geometric schedule, the ratio loss at weight 2) was picked for 1/R "
        "before training, and where the learned gates land after training is what the row reports, not forced. "
        "The reduction happens between a "
        "block's attention and its MLP; EViT reduces at blocks floor(i * depth / 4), i = 1, 2, 3 (its 4, 7, 10 of "
        "12), ToMe merges r tokens per block, capped at what a block can merge.",
        "- Selection: every token-reduction and width/depth setting is fixed by the FLOPs target; the learning rate "
        f"was chosen on the validation split ({LR_CHOICE.split(': ', 1)[1].replace('%%', '%')}) and applies to every "
        "arm trained from scratch; the test accuracy was read once per arm, after everything was fixed.",
        f"- Latency: torch.utils.benchmark, {args.threads} thread(s), eval mode, no_grad; per arm the minimum over "
        f"{args.rounds} interleaved rounds of the mean of {CALLS[1]} forwards at batch 1 and {CALLS[64]} at batch "
        "64; speedup = dense latency / arm latency in the same run, beside its ceiling (the FLOPs ratio): "
        "speedup/flops_ratio. The two EViT rows at each R run the same computation, so their latency ratio "
        f"({noise}) shows the measurement's noise.",
        f"- Time: {train_seconds / 60:.1f} min of training, {eval_seconds / 60:.1f} min of testing, "
        f"{(time.perf_counter() - start) / 60:.1f} min in all.",
        f"- Command: `{command}`",
        "",
    ])
    atomic_write(f"{stem}.md", lambda f: f.write(md))
    print(md)


if __name__ == "__main__":
    main()
