"""Deep Compression (Han et al. 2016) on LeNet-300-100 and LeNet-5 with Fashion-MNIST.

Trains each dense LeNet, then prunes (iterative per-layer magnitude pruning, rounds of +10% with
--prune-epochs of retraining each and --final-epochs after the last, per-layer keep ratios as Han et
al.), shares weights by k-means (8 bits conv / 5 bits fc unless BITS says otherwise) with centroid
fine-tuning, Huffman-codes the cluster indices and relative sparse indices, and decodes the streams
back into a fresh model to measure the final accuracy. Every training and retraining runs through the
project's Lightning loop (``GatedClassifier(gate=None)``, Adam, cosine per fit). Writes, per model,
``deep_compression_<model>_stages.{csv,md}`` (Han's Table 1: accuracy and bytes after each stage) and
``..._layers.{csv,md}`` (Han's Tables 2-3).

    python experiments/deep_compression.py --models lenet300_100 lenet5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import dynprune.backbones as B
from dynprune.compression import DeepCompressionConfig, deep_compression
from dynprune.data import FASHION_MNIST_DIR, FashionMNISTDataModule
from dynprune.io import to_markdown
from dynprune.static import accuracy, finetune, write_table

# Per-layer pruning targets in the spirit of Han et al. (first layers and the classifier kept denser).
SPARSITY = {
    "lenet300_100": {"net.1": 0.93, "net.3": 0.92, "net.5": 0.75},
    "lenet5": {"features.0": 0.5, "features.3": 0.85, "classifier.1": 0.96, "classifier.3": 0.93,
               "classifier.5": 0.8},
    # Han et al.'s Table 3 keep ratios for Caffe's LeNet (66% / 12% / 8% / 19%).
    "lenet5_caffe": {"features.0": 0.34, "features.3": 0.88, "classifier.1": 0.92, "classifier.3": 0.81},
}
# Per-layer k-means bits that differ from --conv-bits / --fc-bits: a 2**8 float32 codebook costs more than
# LeNet-5's second conv (2.4k weights) saves at 8 bits.
BITS: dict[str, dict[str, int]] = {"lenet300_100": {}, "lenet5": {"features.0": 6, "features.3": 6},
                                   "lenet5_caffe": {"features.0": 6}, "resnet20": {}}
CONV_HEAVY = {"resnet20": 0.8}  # uniform sparsity of every conv/linear but the stem (kept at half of it)


def default_sparsity(name: str, model: torch.nn.Module) -> dict[str, float]:
    """SPARSITY[name], or for a conv-heavy backbone one sparsity for every weight layer (stem at half)."""
    if name in SPARSITY:
        return SPARSITY[name]
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return {n: CONV_HEAVY[name] / (2 if i == 0 else 1) for i, n in enumerate(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SPARSITY), choices=[*SPARSITY, *CONV_HEAVY])
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    parser.add_argument("--prune-epochs", type=int, default=2, help="retraining epochs per pruning round")
    parser.add_argument("--final-epochs", type=int, default=5, help="retraining epochs after the last round")
    parser.add_argument("--prune-start", type=float, default=0.5, help="first round's sparsity (largest layer)")
    parser.add_argument("--prune-step", type=float, default=0.1, help="sparsity added per round")
    parser.add_argument("--sparsity", type=json.loads, default=None,
                        help='per-layer final sparsity as JSON, e.g. \'{"net.1": 0.93}\' (default: SPARSITY)')
    parser.add_argument("--quant-epochs", type=int, default=3, help="centroid fine-tuning epochs")
    parser.add_argument("--conv-bits", type=int, default=8)
    parser.add_argument("--fc-bits", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=0, help="0 = all 55k training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the results files (runs side by side)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; k-means and Huffman coding stay on the CPU")
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = FashionMNISTDataModule(args.data_dir, batch_size=128, train_subset=args.train_subset, seed=args.seed)
    dm.setup()
    summary = []
    trainer = {"accelerator": "gpu" if args.device.startswith("cuda") else "cpu", "devices": 1}
    for name in args.models:
        torch.manual_seed(args.seed)
        start = time.time()
        model = B.create(name)
        finetune(model, dm, args.epochs, 1e-3, optimizer="adam", trainer=trainer)
        print(f"{name}: dense test accuracy {100 * accuracy(model, dm, trainer=trainer):.2f}%")
        cfg = DeepCompressionConfig(
            sparsity=args.sparsity or default_sparsity(name, model), prune_start=args.prune_start,
            prune_step=args.prune_step,
            prune_epochs=args.prune_epochs, final_epochs=args.final_epochs, prune_lr=5e-4,
            conv_bits=args.conv_bits, fc_bits=args.fc_bits,
            bits=BITS[name], quant_epochs=args.quant_epochs,
            quant_lr=1e-4, seed=args.seed,
        )
        result = deep_compression(model, dm, cfg, trainer=trainer)
        title = f"Deep Compression, {name} on Fashion-MNIST (test accuracy %, bytes, ratio vs float32 dense)"
        write_table(result.stages, args.out / f"deep_compression_{name}{args.tag}_stages", title)
        write_table(result.layers, args.out / f"deep_compression_{name}{args.tag}_layers",
                    f"Deep Compression per layer, {name} (P: pruned, Q: quantized, H: Huffman)")
        print(to_markdown(result.stages), to_markdown(result.layers), sep="\n")
        dense, final = result.stages[0], result.stages[-1]
        summary.append({"model": name, "dense_acc": dense["accuracy"], "compressed_acc": final["accuracy"],
                        "drop_pt": round(dense["accuracy"] - final["accuracy"], 2), "dense_bytes": dense["bytes"],
                        "compressed_bytes": final["bytes"], "ratio": final["ratio"],
                        "minutes": round((time.time() - start) / 60, 1), "device": args.device,
                        "command": " ".join(sys.argv[1:])})
    write_table(summary, args.out / f"deep_compression_summary{args.tag}", "Deep Compression summary (Fashion-MNIST)")
    print(to_markdown(summary))


if __name__ == "__main__":
    main()
