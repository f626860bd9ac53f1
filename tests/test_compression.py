"""Deep Compression: Huffman and relative-index round trips, k-means codebooks with at most 2**bits
values, centroid fine-tuning with per-cluster gradient sums, and an exact compressed-model decoder."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_close_rounding
from torch.nn.utils import parametrize

import dynprune.backbones as B
from dynprune.compression import (
    DeepCompressionConfig,
    bake,
    compress_model,
    deep_compression,
    huffman_decode,
    huffman_encode,
    kmeans_codebook,
    layer_bits,
    quantize_model,
    relative_encode,
    relative_positions,
    shared_weights,
)
from dynprune.data import DigitsDataModule
from dynprune.static import accuracy, finetune, prune_model, weight_layers


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(input_size=8)
    dm.setup()
    return dm


def test_huffman_round_trip_and_length() -> None:
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.3, 5000) - 1, 31)
    stream = huffman_encode(symbols)
    np.testing.assert_array_equal(huffman_decode(stream), symbols)
    _, freq = np.unique(symbols, return_counts=True)
    p = freq / freq.sum()
    entropy = -(p * np.log2(p)).sum() * len(symbols)
    assert entropy <= len(stream.bits) < entropy + len(symbols)  # Huffman is within 1 bit/symbol of entropy
    assert len(stream.bits) < 5 * len(symbols)  # beats the 5-bit fixed-width code
    assert stream.table_bits == 16 * len(stream.count) + 5 * len(stream.symbols)
    one = huffman_encode(np.array([7, 7, 7]))
    assert len(one.bits) == 3 and huffman_decode(one).tolist() == [7, 7, 7]
    assert huffman_decode(huffman_encode(np.zeros(0, np.int64))).size == 0
    with pytest.raises(ValueError, match="non-negative integers"):
        huffman_encode(np.array([1, -2]))


def test_relative_index_inserts_fillers_when_a_gap_exceeds_the_width() -> None:
    mask = np.zeros(40, bool)
    mask[[0, 3, 4, 20, 39]] = True
    index = relative_encode(mask, index_bits=3)  # at most 7 zeros skipped per entry
    assert index.skips.tolist() == [0, 2, 0, 7, 7, 7, 7, 2]
    assert index.filler.tolist() == [False, False, False, True, False, True, True, False]
    assert index.positions().tolist() == [0, 3, 4, 12, 20, 28, 36, 39]
    rng = np.random.default_rng(1)
    for density in (0.02, 0.1, 0.6):
        mask = rng.random(5000) < density
        index = relative_encode(mask, index_bits=4)
        assert index.skips.max() < 16
        pos = relative_positions(index.skips)
        np.testing.assert_array_equal(pos[~index.filler], np.flatnonzero(mask))
        assert not mask[pos[index.filler]].any()


def test_kmeans_codebook_linear_init_and_size() -> None:
    values = np.random.default_rng(0).normal(size=2000).astype(np.float32)
    centroids, labels = kmeans_codebook(values, bits=3)
    assert len(centroids) == 8 and labels.min() == 0 and labels.max() == 7
    assert np.all(np.diff(centroids) > 0)  # linear init keeps the centroids ordered
    assert np.abs(centroids[labels] - values).mean() < 0.2 * values.std()  # 8 levels: about 1/10 of a std
    c2, l2 = kmeans_codebook(np.array([0.5, 0.5, -1.0], np.float32), bits=4)  # fewer distinct values than 2**bits
    assert sorted(c2.tolist()) == [-1.0, 0.5] and len(l2) == 3
    with pytest.raises(ValueError, match="bits must be in \\[1, 16\\], got 0"):
        kmeans_codebook(values, bits=0)


def _quantized_lenet5(conv_bits: int = 3, fc_bits: int = 2) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = B.create("lenet5", input_size=16)
    prune_model(model, "l1_unstructured", 0.6)
    zeros = {n: m.weight.detach() == 0 for n, m in weight_layers(model).items()}
    quantize_model(model, layer_bits(model, conv_bits, fc_bits))
    return model, zeros


def test_quantize_keeps_at_most_2_pow_bits_values_and_the_zeros() -> None:
    model, zeros = _quantized_lenet5()
    for name, m in weight_layers(model).items():
        w = m.weight.detach()
        bits = 3 if isinstance(m, torch.nn.Conv2d) else 2
        assert len(torch.unique(w[w != 0])) <= 2**bits, name
        assert torch.equal(w == 0, zeros[name]), name
    assert layer_bits(model, 8, 5, {"classifier.5": 6}) == {
        "features.0": 8, "features.3": 8, "classifier.1": 5, "classifier.3": 5, "classifier.5": 6}
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc'\] in bits"):
        layer_bits(model, overrides={"fc": 4})


@pytest.mark.numerics
def test_centroid_gradient_is_the_sum_over_its_cluster() -> None:
    model, _ = _quantized_lenet5()
    layer = model.classifier[1]
    with parametrize.cached():  # the forward then uses this very weight tensor, built from the codebook
        weight = layer.weight
        weight.retain_grad()
        model(torch.randn(4, 1, 16, 16)).square().sum().backward()
    sw = shared_weights(model)["classifier.1"]
    sums = [torch.zeros_like(sw.centroids).index_add_(0, sw.labels[sw.mask], g[sw.mask])
            for g in (weight.grad, weight.grad.abs())]  # the cluster sums may cancel: scale by |terms|
    assert_close_rounding(sw.centroids.grad, sums[0], scale=sums[1].max().item())
    assert layer.parametrizations.weight.original.grad is None


def test_centroid_finetuning_keeps_zeros_and_codebook_size(digits: DigitsDataModule) -> None:
    dm = DigitsDataModule(input_size=16)
    dm.setup()
    model, zeros = _quantized_lenet5()
    before = {n: sw.centroids.detach().clone() for n, sw in shared_weights(model).items()}
    finetune(model, dm, 1, 1e-2, weight_decay=1e-3)
    for name, m in weight_layers(model).items():
        w = m.weight.detach()
        assert torch.equal(w == 0, zeros[name]), name
        assert len(torch.unique(w[w != 0])) <= (8 if isinstance(m, torch.nn.Conv2d) else 4)
        assert not torch.equal(shared_weights(model)[name].centroids, before[name])


def test_compressed_model_decodes_exactly_and_keeps_accuracy(digits: DigitsDataModule) -> None:
    model = B.create("lenet300_100", input_size=8)
    finetune(model, digits, 3, 1e-2, optimizer="adam")
    prune_model(model, "l1_unstructured", {"net.1": 0.9, "net.3": 0.9, "net.5": 0.5})
    quantize_model(model, layer_bits(model, fc_bits=4))
    compressed = compress_model(model, layer_bits(model, fc_bits=3))
    quantized_acc = accuracy(model, digits)
    fresh = B.create("lenet300_100", input_size=8)
    compressed.decode_into(fresh)
    baked = bake(copy.deepcopy(model)).state_dict()
    assert fresh.state_dict().keys() == baked.keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, baked[name]), name
    assert accuracy(fresh, digits) == quantized_acc
    layer = compressed.layers["net.1"]
    assert layer.fillers > 0 and layer.entries == 1920 + layer.fillers  # 10% of 64*300 kept, 3-bit gaps
    bits = layer.stage_bits()
    assert bits["pruned"] == layer.entries * 35
    assert bits["quantized"] == layer.entries * (5 + 3) + 32 * 16  # 16 clusters + filler code -> 5 bits
    assert bits["huffman"] == len(layer.codes.bits) + len(layer.skips.bits) + layer.codes.table_bits \
        + layer.skips.table_bits + 32 * 16
    assert bits["huffman"] < bits["quantized"] < bits["pruned"]
    with pytest.raises(ValueError, match=r"index_bits and the quantized layers differ on \['net.9'\]"):
        compress_model(model, {**layer_bits(model), "net.9": 4})


def test_deep_compression_pipeline_table(digits: DigitsDataModule) -> None:
    model = B.create("lenet300_100", input_size=8)
    finetune(model, digits, 3, 1e-2, optimizer="adam")
    cfg = DeepCompressionConfig(sparsity={"net.1": 0.9, "net.3": 0.9, "net.5": 0.5}, prune_start=0.6,
                                prune_step=0.3, prune_lr=3e-3, fc_bits=4, quant_lr=1e-3)
    result = deep_compression(model, digits, cfg, log=None)
    stages = {row["stage"]: row for row in result.stages}
    assert list(stages) == ["dense", "pruned", "quantized", "huffman"]
    assert stages["dense"]["bytes"] == 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert stages["huffman"]["accuracy"] == stages["quantized"]["accuracy"]
    assert stages["huffman"]["ratio"] > stages["quantized"]["ratio"] > stages["pruned"]["ratio"] > 5
    assert stages["quantized"]["accuracy"] > 85
    total = result.layers[-1]
    assert total["layer"] == "total (weights)" and total["density_%"] == pytest.approx(10.8, abs=0.01)
