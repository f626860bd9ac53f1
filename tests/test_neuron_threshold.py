"""The training-free neuron threshold baseline (dynprune.granularity.neuron.calibrate_thresholds): the gates become a
truncated-SVD estimate of fc1's pre-activations minus a per-layer threshold that drops the target share of units
on the calibration data; the model compiles to the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rounding, weight_depth

import dynprune as dp
from dynprune.backbones import create, create_language_model
from dynprune.granularity.neuron import calibrate_thresholds
from dynprune.runtime import compile_for_inference


def test_at_full_rank_the_gates_keep_exactly_the_units_whose_pre_activation_reaches_the_threshold() -> None:
    torch.manual_seed(0)
    model = create("vit", num_classes=10, in_chans=1, input_size=28, width_mult=0.25, depth_mult=0.34).eval()
    dp.gate_model(model, gate="sigmoid", granularity="neuron", min_hidden=48)  # rank 24 = D: the SVD is exact
    x = torch.randn(6, 1, 28, 28)
    thresholds = calibrate_thresholds(model, [x[:3], x[3:]], sparsity=0.6)
    assert list(thresholds) == [f"blocks.{i}.mlp.fc1" for i in range(3)]
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0]))
             for n in thresholds]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    masks = dp.collect_masks(model)
    for name, tau in thresholds.items():
        fc1, gate = model.get_submodule(name), dp.gates_of(model)[name]
        pre = F.linear(inputs[name], fc1.weight, fc1.bias)  # not fc1(): its hooks would mask it
        with torch.no_grad():
            assert_close_rounding(gate.logits(inputs[name]) + tau, pre, depth=3)
        decided = masks[name].bool()
        assert bool((pre[decided] >= tau - 1e-4 * pre.abs().max()).all())
        assert bool((pre[~decided] <= tau + 1e-4 * pre.abs().max()).all())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_the_calibrated_share_of_units_is_dropped_and_the_model_compiles(sparsity: float) -> None:
    torch.manual_seed(0)
    model = create_language_model("char_gpt", 11, 16, dim=32, depth=2, heads=4).eval()
    dp.gate_model(model, gate="l1", granularity="neuron", example=torch.randint(0, 11, (1, 16)))
    ids = torch.randint(0, 11, (8, 16))
    with dp.gates_disabled(model), torch.no_grad():
        dense = model(ids)
    calibrate_thresholds(model, [ids], sparsity)
    with torch.no_grad():
        out = model(ids)
    masks = dp.collect_masks(model)
    for mask in masks.values():
        assert mask.shape == (8, 16, 128)
        assert float(mask.mean()) == pytest.approx(1 - sparsity, abs=2 / mask.numel() ** 0.5)
    assert 0 < F.mse_loss(out, dense) < dense.var()  # sparser, still close to the dense model
    mlp = sum(d for n, d in dp.gating_info(model).flops.per_layer(masks).items() if ".mlp." in n)
    dense_mlp = sum(lay.dense for lay in dp.gating_info(model).flops.layers if ".mlp." in lay.name)
    assert float(mlp.mean() / dense_mlp) == pytest.approx(1 - sparsity, abs=0.02)
    compiled = compile_for_inference(model)
    assert_close_rounding(compiled(ids), out, depth=weight_depth(model))


def test_bad_calls_say_what_is_wrong() -> None:
    model = create_language_model("char_gpt", 11, 16, dim=32, depth=1, heads=4).eval()
    with pytest.raises(ValueError, match="needs a model gated at granularity 'neuron'"):
        calibrate_thresholds(model, [torch.zeros(1, 16, dtype=torch.long)], 0.5)
    dp.gate_model(model, gate="sigmoid", granularity="neuron", example=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\), got 1.0"):
        calibrate_thresholds(model, [torch.zeros(1, 16, dtype=torch.long)], 1.0)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate_thresholds(model, [], 0.5)


def test_sequential_calibration_drops_the_share_at_every_site_of_the_gated_model() -> None:
    """Each site is calibrated on the inputs it sees once the earlier sites drop units, so the gated model keeps
    1 - sparsity of the units at every site of the calibration data (up to one unit of the quantile); the dense-pass
    calibration only holds that at the first site. A gate forced before the call stays forced after it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (8, 16))
    kept = {}
    for sequential in (True, False):
        torch.manual_seed(1)
        model = create_language_model("char_gpt", 11, 16, dim=32, depth=4, heads=4).eval()
        dp.gate_model(model, gate="sigmoid", granularity="neuron", example=ids[:1])
        calibrate_thresholds(model, [ids[:4], ids[4:]], 0.7, sequential=sequential)
        with torch.no_grad():
            model(ids)
        kept[sequential] = [float(m.float().mean()) for m in dp.collect_masks(model).values()]
    n = 8 * 16 * 128
    assert kept[True] == pytest.approx([0.3] * 4, abs=1.5 / n)
    assert kept[False][0] == pytest.approx(0.3, abs=1.5 / n)
    assert max(abs(k - 0.3) for k in kept[False][1:]) > 10 / n  # later sites drift without the sequence

    gate = model.get_submodule(next(iter(dp.gating_info(model).sites.values())).gate_path)
    closed = torch.zeros(128, dtype=torch.bool)
    gate.force(closed)
    calibrate_thresholds(model, [ids], 0.5)
    assert gate.forced is closed
