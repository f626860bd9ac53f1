"""Dispatch between the compiled model's exact paths and memory layouts: outputs are equal either way, the masked
path runs the dense folded compute, channels-last stays channels-last through the thin layers, and a call takes the
path and layout of the nearest measured batch-size bucket (no time asserted)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rounding
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.runtime import compile_for_inference
from dynprune.runtime.dispatch import Bucket, Plan, batches_of
from dynprune.runtime.layout import is_channels_last

SHAPE = (1, 12, 12)


def _gated(granularity: str) -> nn.Module:
    torch.manual_seed(0)
    net = dp.backbones.create("resnet20", num_classes=10, in_chans=SHAPE[0], input_size=SHAPE[1], width_mult=0.5)
    model = net
    for g in granularity.split("+"):
        model = dp.gate_model(model, gate="sigmoid", granularity=g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.bias.normal_(0, 0.2)
    return model.eval()


def _mixed(model: nn.Module, batch: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(batch)
    out = {}
    for name, site in dp.gating_info(model).sites.items():
        out[name] = (torch.rand(batch, site.units, generator=gen) < 0.3).float()
    return out


def _flops(model: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("granularity", ["channel", "block", "width", "block+channel"])
def test_both_paths_give_the_masked_models_outputs(granularity: str) -> None:
    model = _gated(granularity)
    compiled = compile_for_inference(model, dispatch=())
    assert compiled.switchable
    assert str(compiled.plan).endswith("every call takes the thin path in the contiguous layout")
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        decisions = _mixed(model, batch)
        for gates in (dp.gates_of(model), compiled.site_gates):
            for name, d in decisions.items():
                gates[name].force(d)
        ref = model(x)
        outs = {path: compiled.pin(path)(x) for path in ("thin", "masked")}
        outs["thin, channels-last"] = compiled.pin("thin", "channels_last")(x)
        for out in outs.values():
            assert_close_rounding(out, ref, depth=25)
        # the masked path computes what the decisions skip (a block at batch 1 is skipped on both paths)
        flops = {path: _flops(compiled.pin(path), x) for path in ("thin", "masked")}
        assert flops["thin"] < flops["masked"] if batch > 1 else flops["thin"] <= flops["masked"]


def test_masked_path_computes_the_dense_folded_model_plus_gates() -> None:
    model = _gated("channel")
    compiled = compile_for_inference(model, dispatch=()).pin("masked")
    info = dp.gating_info(model)
    x = torch.randn(1, *SHAPE)
    for name, d in _mixed(model, 1).items():
        compiled.site_gates[name].force(d)
    assert _flops(compiled, x) == pytest.approx(info.flops.dense_total + info.flops.gate_flops, rel=1e-6)


def test_calls_follow_the_plan_of_the_nearest_bucket() -> None:
    model = _gated("channel")
    compiled = compile_for_inference(model, dispatch=(1, 4), example=torch.randn(3, *SHAPE))
    assert sorted(compiled.plan.buckets) == [1, 4]
    assert all(b.thin_ms > 0 and b.masked_ms > 0 for b in compiled.plan.buckets.values())
    compiled.plan = Plan({1: Bucket(1, 2.0, 1.0), 8: Bucket(8, 1.0, 2.0)})  # what a measurement could give
    layers = compiled.switchable
    for batch, path in ((1, "masked"), (2, "masked"), (3, "thin"), (8, "thin"), (500, "thin")):
        compiled(torch.randn(batch, *SHAPE))
        assert compiled.path == path
        assert all(m.masked == (path == "masked") for m in layers)
    compiled.pin("masked")(torch.randn(8, *SHAPE))
    assert compiled.path == "masked"
    with pytest.raises(ValueError, match="unknown path 'dense'; choose one of: thin, masked"):
        compiled.pin("dense")


def test_dense_model_has_one_path_and_a_measured_layout_per_bucket() -> None:
    net = dp.backbones.create("lenet5", in_chans=1, input_size=SHAPE[1]).eval()
    compiled = compile_for_inference(net, SHAPE, dispatch=(1, 8))
    assert not compiled.switchable and sorted(compiled.plan.buckets) == [1, 8]
    for bucket in compiled.plan.buckets.values():
        assert bucket.path == "thin" and bucket.thin_ms == bucket.masked_ms
        assert set(bucket.layout_ms) == {"contiguous", "channels_last"} and min(bucket.layout_ms.values()) > 0
    with torch.no_grad():
        x = torch.randn(3, *SHAPE)
        ref = net(x)
        for layout in ("contiguous", "channels_last"):
            assert_close_rounding(compiled.pin(None, layout)(x), ref, depth=5)


def test_calls_take_the_layout_of_the_nearest_bucket_and_thin_layers_keep_channels_last() -> None:
    model = _gated("channel")
    compiled = compile_for_inference(model, dispatch=())
    compiled.plan = Plan({1: Bucket(1, 1.0, 2.0, {"contiguous": 1.0, "channels_last": 2.0}),
                          8: Bucket(8, 1.0, 2.0, {"contiguous": 2.0, "channels_last": 1.0})})
    layouts: list[bool] = []
    thin = [m for m in compiled.net.modules() if type(m).__name__ == "ThinLayer" and m.scatter]
    assert thin  # a layer that writes its kept channels back to full width
    hooks = [m.register_forward_hook(lambda _m, _a, out: layouts.append(is_channels_last(out))) for m in thin]
    x = torch.randn(8, *SHAPE)
    ref = compiled.pin("thin", "contiguous")(x)
    compiled.pin(None)
    for batch, channels_last in ((1, False), (8, True), (64, True)):
        layouts.clear()
        out = compiled(x[:batch] if batch <= 8 else x.repeat(8, 1, 1, 1))
        assert layouts and all(flag == channels_last for flag in layouts)
        assert_close_rounding(out[:min(batch, 8)], ref[:min(batch, 8)], depth=25)
    for hook in hooks:
        hook.remove()
    with pytest.raises(ValueError, match="unknown layout 'nhwc'; choose one of: contiguous, channels_last"):
        compiled.pin(None, "nhwc")
    assert Bucket(4, 1.0, 1.0).layout == "contiguous"  # nothing timed: contiguous
    assert Bucket(4, 1.0, 1.0, {"contiguous": 1.0, "channels_last": 1.0}).layout == "contiguous"  # a tie


def test_timed_batches_are_consecutive_inputs_of_the_example() -> None:
    x = torch.arange(5.0)[:, None]
    assert [b.flatten().tolist() for b in batches_of(x, 2)] == [[0, 1], [2, 3]]
    assert [b.flatten().tolist() for b in batches_of(x, 1, count=3)] == [[0], [1], [2]]
    assert [b.flatten().tolist() for b in batches_of(x, 7)] == [[0, 1, 2, 3, 4, 0, 1]]
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        batches_of(x, 0)
