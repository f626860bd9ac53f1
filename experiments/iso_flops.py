"""Static vs dynamic pruning at equal FLOPs on Fashion-MNIST (the DESIGN's 8 + 4 epoch budget).

1. Train the dense backbone for ``--epochs``.
2. Static: for each reduction R, L1-filter prune the dense model to 1/R FLOPs (physically removed),
   fine-tune ``--finetune-epochs``.
3. Dynamic: for each R and gate family, warm-start a gated copy from the dense weights with
   ``target = 1/R`` (penalty lam * |mean FLOPs ratio - target|) and train ``--finetune-epochs``.

Writes experiments/results/iso_flops_<backbone>.{csv,md}; test accuracy, and FLOPs ratio = physical FLOPs
for static, mean per-input effective FLOPs for dynamic.

    python experiments/iso_flops.py --ratios 2 4 8 --gates sigmoid [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import dynprune as dp
from dynprune.io import to_markdown, write_table
from dynprune.static import evaluate, fraction_for_flops, prune_model, remove_channels, train_epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--gates", nargs="+", default=["sigmoid"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--lam", type=float, default=2.0, help="weight of |FLOPs ratio - target| for the gates")
    parser.add_argument("--gate-lr", type=float, default=None)
    parser.add_argument("--init-bias", type=float, default=3.0)
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--data-dir", default=dp.data.FASHION_MNIST_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    L.seed_everything(args.seed)
    dm = dp.FashionMNISTDataModule(args.data_dir, batch_size=128, train_subset=args.train_subset,
                                   seed=args.seed)
    dm.setup()
    shape, start = (1, 28, 28), time.time()
    dense = dp.backbones.create(args.backbone).to(args.device)
    train_epochs(dense, dm.train_dataloader(), args.epochs, args.lr, weight_decay=5e-4)
    rows = [{"method": "dense", "R": 1.0, "acc": round(100 * evaluate(dense, dm.test_dataloader()), 2),
             "flops_ratio": 1.0, "p90_ratio": 1.0}]
    dense = dense.cpu()
    dense_path = args.out / f".dense_{args.backbone}.pt"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(dense.state_dict(), dense_path)
    dense_flops = dp.count_flops(dense, shape)[0]
    title = (f"Static vs dynamic at equal FLOPs, {args.backbone} on Fashion-MNIST (dense {args.epochs} ep, then "
             f"{args.finetune_epochs} ep prune+fine-tune or gated training; lam={args.lam}, device {args.device})")
    print(rows[-1], f"{time.time() - start:.0f}s", flush=True)
    for ratio in args.ratios:
        fraction = fraction_for_flops(dense, ratio, shape)
        small = remove_channels(prune_model(copy.deepcopy(dense), "l1_structured", fraction)).to(args.device)
        train_epochs(small, dm.train_dataloader(), args.finetune_epochs, args.finetune_lr, weight_decay=5e-4)
        acc = evaluate(small, dm.test_dataloader())
        flops = dp.count_flops(small.cpu(), shape)[0] / dense_flops
        rows.append({"method": "static l1-filter", "R": ratio, "acc": round(100 * acc, 2),
                     "flops_ratio": round(flops, 4), "p90_ratio": round(flops, 4)})
        print(rows[-1], f"{time.time() - start:.0f}s", flush=True)
        for gate in args.gates:
            module = dp.GatedClassifier(args.backbone, gate=gate, lam=args.lam, target=1 / ratio,
                                        init_from=str(dense_path), lr=args.finetune_lr, gate_lr=args.gate_lr,
                                        gate_kwargs={"init_bias": args.init_bias})
            cb = dp.FlopsCallback(plot=False, verbose=False, dirpath=tempfile.mkdtemp(prefix="iso_flops_"))
            trainer = L.Trainer(max_epochs=args.finetune_epochs, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                num_sanity_val_steps=0, callbacks=[cb],
                                accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1)
            trainer.fit(module, dm)
            result = trainer.test(module, dm, verbose=False)[0]
            rows.append({"method": f"dynamic {gate}", "R": ratio, "acc": round(100 * result["test/acc"], 2),
                         "flops_ratio": round(result["test/flops_mean_ratio"], 4),
                         "p90_ratio": round(result["test/flops_p90_ratio"], 4)})
            print(rows[-1], f"{time.time() - start:.0f}s", flush=True)
            write_table(rows, args.out / f"iso_flops_{args.backbone}", title)  # keep what finished
    dense_path.unlink()
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
