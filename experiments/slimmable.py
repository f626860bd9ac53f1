"""Slimmable ResNet-20 on Fashion-MNIST: width x accuracy x FLOPs of one supernet (switchable BN,
sandwich rule, in-place distillation) against independently trained thin networks of the same
widths, with the same Lightning loop, optimiser (SGD nesterov, cosine), lr, epochs, data and seed.

Writes ``slimmable_<backbone>.{csv,md}``; the md ends with the exact command and setup.

    nice -n 10 python experiments/slimmable.py --train-subset 4000 --test-subset 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import lightning as L
import torch

from dynprune.data import FASHION_MNIST_DIR, FashionMNISTDataModule
from dynprune.flops import count_flops
from dynprune.io import atomic_write, write_table
from dynprune.module import GatedClassifier
from dynprune.slimmable import SlimmableClassifier


def fit_and_test(module: L.LightningModule, dm: FashionMNISTDataModule, epochs: int,
                 accelerator: str = "cpu") -> tuple[dict, float]:
    """Train ``module`` for ``epochs`` and return (test metrics, training seconds)."""
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator=accelerator, devices=1,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    return {k: float(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=4000, help="first N training images (0 = all 60k)")
    parser.add_argument("--test-subset", type=int, default=2000, help="0 = all 10k test images")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--num-random", type=int, default=2, help="random widths per sandwich step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu", help="Lightning accelerator: cpu or gpu")
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    parser.add_argument("--part", choices=["all", "supernet", "thin", "table"], default="all",
                        help="supernet / thin: train one side and save it (two processes side by side); "
                             "table: join the two saved sides; all: everything in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = FashionMNISTDataModule(args.data_dir, batch_size=128, train_subset=args.train_subset,
                                test_subset=args.test_subset, seed=args.seed)
    dm.setup()
    shape = (1, 28, 28)
    stem = args.out / f"slimmable_{args.backbone}"
    sides = {"supernet": Path(f"{stem}_supernet.json"), "thin": Path(f"{stem}_thin.json")}

    def save(part: str, data: dict) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(sides[part], lambda f: json.dump(data, f))

    if args.part in ("all", "supernet"):
        L.seed_everything(args.seed)
        supernet = SlimmableClassifier(args.backbone, widths=args.widths, num_random=args.num_random, lr=args.lr)
        metrics, seconds = fit_and_test(supernet, dm, args.epochs, args.device)
        flops = {str(w): f for w, f in supernet.flops.items()}
        save("supernet", {"metrics": metrics, "seconds": seconds, "flops": flops})
    if args.part in ("all", "thin"):
        thin_acc, thin_flops, thin_seconds = {}, {}, 0.0
        for w in sorted(args.widths):
            L.seed_everything(args.seed)
            thin = GatedClassifier(args.backbone, gate=None, width_mult=w, lr=args.lr)
            metrics, seconds = fit_and_test(thin, dm, args.epochs, args.device)
            thin_acc[str(w)], thin_flops[str(w)] = metrics["test/acc"], count_flops(thin.model, shape)[0]
            thin_seconds += seconds
        save("thin", {"acc": thin_acc, "flops": thin_flops, "seconds": thin_seconds})
    if args.part in ("supernet", "thin"):
        return
    missing = [str(path) for path in sides.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"--part table needs {' and '.join(missing)}: run --part supernet and --part thin")
    slim, thin_side = (json.loads(path.read_text()) for path in sides.values())
    slim_seconds, thin_seconds = slim["seconds"], thin_side["seconds"]
    rows = []
    dense_flops = slim["flops"][str(max(args.widths))]
    for w in sorted(args.widths):
        flops = thin_side["flops"][str(w)]
        if flops != slim["flops"][str(w)]:
            raise RuntimeError(f"width {w}: thin model has {flops} FLOPs, the supernet {slim['flops'][str(w)]}")
        slim_acc, thin_acc = slim["metrics"][f"test/acc_w{w:g}"], thin_side["acc"][str(w)]
        rows.append({"width": w, "MFLOPs": flops / 1e6, "FLOPs ratio": flops / dense_flops, "slimmable acc": slim_acc,
                     "thin acc": thin_acc, "slimmable - thin (pt)": 100 * (slim_acc - thin_acc)})
    write_table(rows, stem, title=f"Slimmable {args.backbone} vs independently trained thin networks (Fashion-MNIST)")
    n_train = len(dm.train_set)
    notes = (
        f"\nTest accuracy on {len(dm.test_set)} Fashion-MNIST test images. One supernet (switchable BN, sandwich rule: "
        f"largest + smallest + {args.num_random} random widths per step, in-place distillation at T=1, "
        f"mean of the per-width losses) vs one "
        f"independently trained `{args.backbone}` per width (`backbones.create(width_mult=w)`, the same channel counts "
        f"and FLOPs as the supernet's width). Both: {args.epochs} epochs on {n_train} training images "
        f"(--train-subset {args.train_subset}, minus the validation hold-out), batch 128, SGD nesterov lr {args.lr} "
        f"momentum 0.9 wd 5e-4, cosine, seed {args.seed}. Training time: supernet {slim_seconds:.0f} s, the "
        f"{len(args.widths)} thin nets {thin_seconds:.0f} s together. Device: {args.device} "
        f"(times are indicative only: the machine was shared with other jobs).\n\n"
        f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'experiments/slimmable.py', *sys.argv[1:]])}`\n"
    )
    md = Path(f"{stem}.md")
    text = md.read_text() + notes
    atomic_write(md, lambda f: f.write(text))
    print(text)


if __name__ == "__main__":
    main()
