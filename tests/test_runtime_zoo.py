"""The runtime on third-party CNNs (transformers' ResNet, RegNet, ConvNeXt, MobileNetV2, EfficientNet from tiny
random configs, no downloads): every gate family x granularity that ``gate_model`` accepts compiles to a model
with the masked model's outputs, or is refused at build time; nothing fails later with an AttributeError."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from conftest import Acceptance, assert_close_rounding, weight_depth
from torch import Tensor, nn

import dynprune as dp
from dynprune.gates import DEFAULT_GATE
from dynprune.runtime import CompiledModel, compile_for_inference
from dynprune.runtime.channels import ThinLayer

tf = pytest.importorskip("transformers")


def compile_untimed(model: nn.Module, *args, **kwargs) -> CompiledModel:
    """compile_for_inference without timing the dispatch paths (tests never time; both paths are checked)."""
    return compile_for_inference(model, *args, dispatch=(), **kwargs)


SHAPE = (3, 32, 32)
# On every model: each granularity and combination with the default family. Executors see only hard decisions, so the
# other families are run at each granularity on one model (the product of all three would double CI time).
GRANULARITY_CASES = [*dp.list_granularities(), "block+channel", "width+channel"]
FAMILY_MODEL = "resnet"


class Logits(nn.Module):
    """A transformers image classifier as a plain (N, C, H, W) -> (N, classes) module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, classes)."""
        return self.model(pixel_values=x).logits


# Two stages, the second with a shape-preserving block, so every granularity has sites.
ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck", num_labels=3)),
    "regnet": lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], groups_width=4, num_labels=3)),
    "convnext": lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, num_labels=3)),
    "mobilenetv2": lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
        image_size=SHAPE[1], depth_multiplier=0.25, num_labels=3)),
    "efficientnet": lambda: tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
        image_size=SHAPE[1], width_coefficient=0.1, depth_coefficient=0.5, hidden_dim=128, num_labels=3)),
}


def _build(name: str) -> nn.Module:
    """Zoo model ``name`` as (N, C, H, W) -> (N, classes) in eval mode."""
    return Logits(ZOO[name]()).eval()


# Only what gate_model accepts is compiled; what it refuses (e.g. tokens, heads and neurons of a CNN) is checked
# to be refused, by name, in test_zoo_refusals_name_the_granularity.
ACCEPTED, REFUSED = Acceptance({n: functools.partial(_build, n) for n in ZOO}, input_shape=SHAPE).split(
    [(name, DEFAULT_GATE, g) for name in ZOO for g in GRANULARITY_CASES]
    + [(FAMILY_MODEL, gate, g) for gate in dp.list_gates() if gate != DEFAULT_GATE for g in dp.list_granularities()])


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    """Each model built once (random weights, random BN statistics so that folding matters)."""
    torch.manual_seed(0)
    models = {}
    for name in ZOO:
        model = _build(name)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        models[name] = model
    return models


def _gated(model: nn.Module, gate: str, granularity: str) -> nn.Module:
    model = copy.deepcopy(model)
    for g in granularity.split("+"):
        model = dp.gate_model(model, gate=gate, granularity=g, input_shape=SHAPE)
    with torch.no_grad():
        for gate_module in dp.gates_of(model).values():
            gate_module.fc2.bias.normal_(0, 0.5)  # decisions differ between inputs
    return model.eval()


def _close(a: Tensor, b: Tensor, model: nn.Module) -> None:
    assert_close_rounding(a, b, depth=weight_depth(model))


@pytest.mark.parametrize(("name", "gate", "granularity"), ACCEPTED)
def test_zoo_compiles_to_the_masked_model(zoo: dict[str, nn.Module], name: str, gate: str, granularity: str) -> None:
    model = _gated(zoo[name], gate, granularity)
    try:
        compiled = compile_untimed(model)  # input_shape comes from gate_model
    except NotImplementedError as err:  # a granularity without an executor is refused at build time, by name
        assert any(g in str(err) for g in granularity.split("+"))
        return
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, *SHAPE, generator=gen)
        _close(compiled(x), model(x), model)
        forced = {n: (torch.rand(batch, s.units, generator=gen) < 0.5).float()
                  for n, s in dp.gating_info(model).sites.items()}
        for gates in (dp.gates_of(model), compiled.site_gates):
            for n, d in forced.items():
                gates[n].force(d)
        _close(compiled(x), model(x), model)
        for gates in (dp.gates_of(model), compiled.site_gates):
            for n in forced:
                gates[n].force(None)


def test_zoo_refusals_name_the_granularity(zoo: dict[str, nn.Module]) -> None:
    """Each combination gate_model refuses (listed once per reason) raises a ValueError naming the granularity."""
    assert REFUSED
    for name, gate, granularity in REFUSED:
        model = copy.deepcopy(zoo[name])
        for g in granularity.split("+"):
            try:
                model = dp.gate_model(model, gate=gate, granularity=g, input_shape=SHAPE)
            except ValueError as err:
                assert f"granularity '{g}'" in str(err), (name, gate, granularity, err)
                break
        else:
            pytest.fail(f"gate_model accepted {name} / {gate} / {granularity}, which its dry run refuses")


def test_compiled_conv_keeps_the_attributes_forward_code_reads(zoo: dict[str, nn.Module]) -> None:
    model = _gated(zoo["mobilenetv2"], "sigmoid", "channel")
    compiled = compile_untimed(model)
    thin = [(n, m) for n, m in compiled.net.named_modules() if isinstance(m, ThinLayer) and m.is_conv]
    assert thin
    for name, executor in thin:
        original = model.get_submodule(name)
        for attr in ("stride", "padding", "kernel_size", "dilation", "groups", "in_channels", "out_channels"):
            assert getattr(executor, attr) == getattr(original, attr), (name, attr)
        assert executor.weight.shape == original.weight.shape


@pytest.mark.parametrize("granularity", ["channel", "block", "width"])
def test_half_precision_gated_model_compiles(granularity: str) -> None:
    net = dp.backbones.create("resnet20", in_chans=1, input_size=16, width_mult=0.5)
    model = dp.gate_model(net, granularity=granularity).eval().half()
    compiled = compile_untimed(model)
    x = torch.randn(2, 1, 16, 16).half()
    forced = {n: torch.ones(2, s.units).half() for n, s in dp.gating_info(model).sites.items()}
    for gates in (dp.gates_of(model), compiled.site_gates):
        for n, d in forced.items():
            gates[n].force(d)
    out, ref = compiled(x), model(x)
    assert out.dtype == torch.float16
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= 1e-2 * max(1.0, scale)
