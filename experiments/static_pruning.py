"""Static channel pruning (L1 filter norm, Li et al. 2017, or another Torch-Pruning criterion) of a
backbone on Fashion-MNIST at fixed FLOPs reductions, with physical channel removal.

Trains the dense backbone, then for each reduction R: ``prune_to_flops`` scores every Torch-Pruning
channel group once and removes its lowest channels until the physically pruned model has 1/R of the
dense FLOPs (FlopCounterMode) within 3% relative (it checks that the outputs equal the masked
model's); the smaller model is fine-tuned. Training and fine-tuning run through the project's
Lightning loop (``GatedClassifier(gate=None)``). Finally times every model on the CPU at batch 1 and
64 (torch.utils.benchmark, interleaved, minimum of the repeats' medians). Writes
``static_pruning_<backbone>.{csv,md}``.

    nice -n 10 python experiments/static_pruning.py --epochs 4 --finetune-epochs 2 --train-subset 25000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dynprune.backbones as B
from dynprune.data import FashionMNISTDataModule
from dynprune.flops import count_flops
from dynprune.io import to_markdown
from dynprune.static import (
    accuracy,
    compare_latency,
    finetune,
    list_criteria,
    param_counts,
    prune_to_flops,
    write_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--method", default="l1_structured", choices=list_criteria(), help="channel criterion")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0], help="FLOPs reductions")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--train-subset", type=int, default=0, help="0 = all 55k training images")
    parser.add_argument("--test-subset", type=int, default=0, help="0 = all 10k test images")
    parser.add_argument("--device", default="cpu", help="training device; latency is always measured on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for training and timing")
    parser.add_argument("--latency-repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dm = FashionMNISTDataModule(batch_size=128, train_subset=args.train_subset, test_subset=args.test_subset,
                                seed=args.seed)
    dm.setup()
    shape = (1, 28, 28)
    start = time.time()
    trainer = {"accelerator": "gpu" if args.device.startswith("cuda") else "cpu", "devices": 1}
    dense = B.create(args.backbone)
    finetune(dense, dm, args.epochs, args.lr, weight_decay=5e-4, trainer=trainer)
    dense_acc = accuracy(dense, dm, trainer=trainer)
    dense = dense.cpu()
    dense_flops = count_flops(dense, shape)[0]
    print(f"dense: acc {100 * dense_acc:.2f}%, {dense_flops / 1e6:.1f} MFLOPs ({(time.time() - start) / 60:.1f} min)")
    models = {f"{args.backbone} dense": dense}
    rows = [{"model": f"{args.backbone} dense", "acc_pruned": "", "acc": round(100 * dense_acc, 2),
             "MFLOPs": round(dense_flops / 1e6, 2), "flops_reduction": 1.0, "params": param_counts(dense)["stored"]}]
    x, y = next(iter(dm.train_dataloader()))
    for ratio in args.ratios:
        small = prune_to_flops(dense, ratio, args.method, shape, batch=(x, y))
        acc_pruned = accuracy(small, dm, trainer=trainer)
        finetune(small, dm, args.finetune_epochs, args.finetune_lr, weight_decay=5e-4, trainer=trainer)
        acc = accuracy(small, dm, trainer=trainer)
        name = f"{args.backbone} {args.method} {ratio:g}x"
        models[name] = small.cpu()
        flops = count_flops(models[name], shape)[0]
        rows.append({"model": name, "acc_pruned": round(100 * acc_pruned, 2), "acc": round(100 * acc, 2),
                     "MFLOPs": round(flops / 1e6, 2), "flops_reduction": round(dense_flops / flops, 2),
                     "params": param_counts(models[name])["stored"]})
        print(rows[-1], f"({(time.time() - start) / 60:.1f} min)")
    for batch in (1, 64):
        lat = compare_latency(models, shape, args.latency_repeats, batch_size=batch, threads=args.threads)
        base = lat[f"{args.backbone} dense"]
        for row in rows:
            speedup = base / lat[row["model"]]
            row[f"latency_b{batch}_ms"] = round(1e3 * lat[row["model"]], 3)
            row[f"speedup_b{batch}"] = round(speedup, 2)
            row[f"speedup_b{batch}/theory"] = round(speedup / row["flops_reduction"], 2)
    title = (f"Static {args.method} pruning of {args.backbone} on Fashion-MNIST (test acc %; FLOPs of the physically "
             f"pruned model; CPU latency, {args.threads} thread; dense {args.epochs} ep, fine-tune "
             f"{args.finetune_epochs} ep, train subset {args.train_subset or 'all'})")
    write_table(rows, args.out / f"static_pruning_{args.backbone}", title)
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
