"""Han et al.'s Deep Compression: (1) magnitude pruning with retraining, (2) k-means weight sharing with
centroid fine-tuning, (3) Huffman coding; with a per-stage size / accuracy table like their Table 1
and a per-layer table like their Tables 2-3, all sizes read off the encoded streams."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from torch import nn

from dynprune.compression.codec import FLOAT_BITS, CompressedModel, compress_model
from dynprune.compression.quantize import bake, layer_bits, quantize_model
from dynprune.static.finetune import accuracy, finetune
from dynprune.static.prune import Amount, weight_layers
from dynprune.static.schedule import iterative_prune, sparsity_schedule


@dataclass
class DeepCompressionConfig:
    """Hyper-parameters of the three stages (sparsity per layer name or one float for all).

    ``prune_epochs`` retrain after every pruning round, ``final_epochs`` more after the last one; every
    retraining is one fit of the project's Lightning loop (``dynprune.static.finetune``), without weight decay.
    """

    sparsity: Amount = 0.9
    prune_start: float = 0.5
    prune_step: float = 0.1
    prune_epochs: int = 1
    final_epochs: int = 0
    prune_lr: float = 1e-3
    conv_bits: int = 8
    fc_bits: int = 5
    bits: dict[str, int] = field(default_factory=dict)
    conv_index_bits: int = 8
    fc_index_bits: int = 5
    quant_epochs: int = 1
    quant_lr: float = 1e-4
    optimizer: str = "adam"
    seed: int = 0


@dataclass
class DeepCompressionResult:
    """The compressed model, the stage table and the per-layer table (rows of plain values)."""

    compressed: CompressedModel
    stages: list[dict[str, Any]]
    layers: list[dict[str, Any]]


def model_bits(model: nn.Module) -> int:
    """Bits of every state-dict tensor at its stored width (32 per float32 value)."""
    return sum(t.numel() * t.element_size() * 8 for t in model.state_dict().values())


def deep_compression(
    model: nn.Module, datamodule: L.LightningDataModule, config: DeepCompressionConfig | None = None,
    log: Any = print, trainer: dict[str, Any] | None = None,
) -> DeepCompressionResult:
    """Run the three stages on a trained ``model`` (modified in place: pruned, then quantized), retraining
    through Lightning (``trainer``: extra ``L.Trainer`` kwargs, e.g. the accelerator).

    Accuracies are on ``datamodule``'s test split; after Huffman coding, on a fresh copy decoded from the
    compressed streams.
    """
    cfg = config or DeepCompressionConfig()
    fit = {"optimizer": cfg.optimizer, "trainer": trainer}
    dense_bits = model_bits(model)
    dense_acc = accuracy(model, datamodule, trainer=trainer)
    targets = sparsity_schedule(cfg.sparsity, cfg.prune_start, cfg.prune_step)
    iterative_prune(model, "l1_unstructured", targets, datamodule, cfg.prune_epochs, cfg.prune_lr, log=log,
                    split="test", **fit)
    finetune(model, datamodule, cfg.final_epochs, cfg.prune_lr, **fit)
    pruned_acc = accuracy(model, datamodule, trainer=trainer)
    quantize_model(model, layer_bits(model, cfg.conv_bits, cfg.fc_bits, cfg.bits), cfg.seed)
    kmeans_acc = accuracy(model, datamodule, trainer=trainer)
    finetune(model, datamodule, cfg.quant_epochs, cfg.quant_lr, **fit)
    quant_acc = accuracy(model, datamodule, trainer=trainer)
    compressed = compress_model(model, layer_bits(model, cfg.conv_index_bits, cfg.fc_index_bits))
    decoded = compressed.decode_into(bake(copy.deepcopy(model)))
    bits = compressed.stage_bits()
    accs = {"pruned": pruned_acc, "quantized": quant_acc, "huffman": accuracy(decoded, datamodule, trainer=trainer)}
    stages = [_stage_row("dense", dense_acc, dense_bits, dense_bits)]
    stages += [_stage_row(stage, accs[stage], bits[stage], dense_bits) for stage in bits]
    stages[2]["acc_before_finetune"] = round(100 * kmeans_acc, 2)
    return DeepCompressionResult(compressed, stages, size_table(compressed, weight_layers(decoded)))


def _stage_row(stage: str, acc: float, bits: int, dense_bits: int) -> dict[str, Any]:
    return {"stage": stage, "accuracy": round(100 * acc, 2), "acc_before_finetune": "",
            "bytes": -(-bits // 8), "ratio": round(dense_bits / bits, 2)}


def size_table(compressed: CompressedModel, layers: Mapping[str, nn.Module]) -> list[dict[str, Any]]:
    """Per-layer rows (Han et al. Table 2/3 style): weights, density, bits per stored entry after
    quantization and after Huffman coding (weights and indices), bytes after each stage, and the
    layer's compression ratio against its float32 weight; the last row totals the weights."""
    rows = []
    for name, layer in compressed.layers.items():
        n, entries = layers[name].weight.numel(), max(1, layer.entries)
        stage = layer.stage_bits()
        rows.append({
            "layer": name, "weights": n, "density_%": round(100 * (layer.entries - layer.fillers) / n, 2),
            "fillers": layer.fillers, "clusters": len(layer.centroids),
            "weight_bits_PQ": layer.code_bits, "weight_bits_PQH": round(layer.codes.total_bits / entries, 2),
            "index_bits_P": layer.index_bits, "index_bits_PQH": round(layer.skips.total_bits / entries, 2),
            **{f"bytes_{k}": -(-v // 8) for k, v in stage.items()},
            "ratio": round(FLOAT_BITS * n / stage["huffman"], 1),
        })
    total_w = sum(r["weights"] for r in rows)
    total = {k: sum(r[k] for r in rows) for k in ("fillers", "bytes_pruned", "bytes_quantized", "bytes_huffman")}
    nonzero = sum(r["density_%"] * r["weights"] / 100 for r in rows)
    rows.append({"layer": "total (weights)", "weights": total_w, "density_%": round(100 * nonzero / total_w, 2),
                 "fillers": total["fillers"], "clusters": "", "weight_bits_PQ": "", "weight_bits_PQH": "",
                 "index_bits_P": "", "index_bits_PQH": "", "bytes_pruned": total["bytes_pruned"],
                 "bytes_quantized": total["bytes_quantized"], "bytes_huffman": total["bytes_huffman"],
                 "ratio": round(FLOAT_BITS * total_w / (8 * total["bytes_huffman"]), 1)})
    return rows
