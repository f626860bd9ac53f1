"""A small trained check of token gating on Fashion-MNIST (one seed, a reduced budget; not the benchmark protocol):
the dense ViT of ``configs/fmnist_vit.yaml`` trained ``--epochs``, then token-gated at ~``--ratio`` x fewer FLOPs
(:func:`dynprune.granularity.token.keep_ratio_for`, sigmoid gates, ratio loss only) and fine-tuned
``--finetune-epochs`` from it; the dense model trained the same extra epochs is the reference. Reports validation
and test accuracy, the token model's mean FLOPs ratio and input dependence on the test split, and the compiled
models' latency at batch 1 and 64 on test images (1 thread, paired interleaved rounds, load average recorded).

    python experiments/token_finetune.py       # experiments/results/token_finetune.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

import dynprune as dp
from dynprune.granularity.token import keep_ratio_for
from dynprune.io import atomic_write, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.task import QUIET

sys.path.insert(0, str(Path(__file__).parent))
from bench_token_latency import paired_times  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def fit(module: dp.GatedClassifier, dm: dp.FashionMNISTDataModule, epochs: int) -> dict[str, float]:
    """Train ``epochs`` (gradients clipped at 1); the validation and test metrics after (with the FLOPs report's
    input-dependence statistics for a gated model)."""
    callbacks = [dp.FlopsCallback(dirpath=tempfile.mkdtemp(), plot=False, verbose=False)] if module.gated else []
    trainer = L.Trainer(max_epochs=epochs, gradient_clip_val=1.0, accelerator="cpu", devices=1, callbacks=callbacks,
                        **QUIET)
    trainer.fit(module, dm)
    val = trainer.validate(module, dm, verbose=False)[0]
    test = trainer.test(module, dm, verbose=False)[0]
    return {**val, **test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(RESULTS / "token_finetune"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = dp.FashionMNISTDataModule(batch_size=64, val_size=1000, train_subset=args.train_subset, test_subset=2000)
    hp = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-5}
    dense = dp.GatedClassifier("vit", gate=None, **hp)
    fit(dense, dm, args.epochs)
    reference = copy.deepcopy(dense)
    ref_metrics = fit(reference, dm, args.finetune_epochs)  # the dense model, same extra epochs
    probe = dp.gate_model(copy.deepcopy(dense.model), "sigmoid", granularity="token")
    rho = keep_ratio_for(probe, args.ratio)
    gated = dp.gate_model(copy.deepcopy(dense.model), "sigmoid", granularity={"token": {"keep_ratio": rho}})
    token = dp.GatedClassifier(gated, gate="sigmoid", lam=0.0, **{**hp, "lr": 5e-4})
    tok_metrics = fit(token, dm, args.finetune_epochs)
    x = torch.stack([dm.test_set[i][0] for i in range(64)])  # set up by the fits
    compiled = {"dense": compile_for_inference(reference.model.eval(), (1, 28, 28)),
                "token": compile_for_inference(token.model.eval())}
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    arms = {(b, name): (lambda m=m, b=b: m(x[:b])) for b in (1, 64) for name, m in compiled.items()}
    times = paired_times(arms, args.rounds)
    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = [{"arm": "dense", "epochs": args.epochs + args.finetune_epochs, "val_acc": ref_metrics["val/acc"],
             "test_acc": ref_metrics["test/acc"], "flops_ratio": 1.0},
            {"arm": f"token (keep_ratio {rho:.3f})", "epochs": f"{args.epochs} dense + {args.finetune_epochs} gated",
             "val_acc": tok_metrics["val/acc"], "test_acc": tok_metrics["test/acc"],
             "flops_ratio": tok_metrics["test/flops_ratio"]}]
    for row, name in zip(rows, ("dense", "token"), strict=True):
        for b in (1, 64):
            ratios = [d / t for d, t in zip(times[(b, "dense")], times[(b, name)], strict=True)]
            row[f"ms_b{b}"] = round(statistics.median(times[(b, name)]), 3)
            row[f"speedup_b{b}"] = round(statistics.median(ratios), 3)
    extra = {k: v for k, v in tok_metrics.items() if k.startswith("test/") and k not in ("test/acc", "test/loss")}
    header = (f"One seed, {args.train_subset} training images (1000 held out for validation), 2000 test images; dense "
              f"ViT (dim 96, depth 6) {args.epochs} epochs, then {args.finetune_epochs} more either dense or token-"
              f"gated (sigmoid, sites before blocks 1, 3, 4, keep_ratio {rho:.3f} for 1/{args.ratio:g} of dense "
              f"FLOPs, ratio loss only). Token model's test input dependence: "
              f"{ {k: round(float(v), 3) for k, v in extra.items()} }. Latency: compiled models on test images, "
              f"1 thread, median over {args.rounds} paired rounds; load average before {load_before}, after "
              f"{load_after}.")
    write_csv(f"{args.out}.csv", rows)
    atomic_write(f"{args.out}.md",
                 lambda f: f.write(f"# Token gating: a small trained check\n\n{header}\n\n{to_markdown(rows)}"))
    print(header)
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
