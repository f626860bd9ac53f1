"""gate_model on library and user-defined models: placement, residual handling, exact zeros."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynprune as dp
from dynprune.gated import GatedLayer, MaskAfter


class UserNet(nn.Module):
    """A model the library has never seen: residual block, grouped conv, functional ops."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.g_bn = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        h = F.relu(self.a_bn(self.a(x)))
        h = F.relu(self.g_bn(self.grouped(h)))
        x = x + self.b(h)  # residual: b's output channels must not be gated
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_user_model_with_residual_and_grouped_conv() -> None:
    model = dp.gate_model(UserNet(), gate="sigmoid", input_shape=(3, 12, 12))
    info = dp.gating_info(model)
    assert info.gated == ["a", "grouped"]  # stem (first), b (residual), head (classifier) skipped
    assert isinstance(model.a, GatedLayer) and isinstance(model.a_bn, MaskAfter)
    assert info.layers["b"].residual and info.layers["grouped"].producer == "a"
    assert info.bypassed == ["a", "grouped"]  # both feed the residual branch through b
    out = model.train()(torch.randn(2, 3, 12, 12))
    out.sum().backward()
    assert model.grouped.gate.fc2.weight.grad.abs().sum() > 0


def test_where_patterns_and_errors() -> None:
    model = dp.gate_model(dp.backbones.create("resnet20"), gate="l1", where=["layer3.*"])
    assert dp.gating_info(model).gated == ["layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"]
    with pytest.raises(ValueError, match="residual"):
        dp.gate_model(dp.backbones.create("resnet20"), where=["layer1.0.conv2"])
    with pytest.raises(ValueError, match="match no Conv2d/Linear"):
        dp.gate_model(dp.backbones.create("resnet20"), where=["nothing*"])
    with pytest.raises(ValueError, match="already gated"):
        dp.gate_model(model)
    with pytest.raises(ValueError, match="input_shape"):
        dp.gate_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    with pytest.raises(ValueError, match="no eligible"):
        dp.gate_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), input_shape=(1, 2, 2))


def test_masked_channels_are_exactly_zero_at_eval() -> None:
    model = dp.gate_model(dp.backbones.create("vgg11", width_mult=0.25), gate="sigmoid")
    for layer in dp.gated_layers(model).values():  # random decisions instead of all-open gates
        nn.init.normal_(layer.gate.fc2.bias, 0.0, 2.0)
    outputs = {}
    for name in dp.gating_info(model).gated:
        norm = model.dynprune.layers[name].norm
        model.get_submodule(norm).register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    masks = dp.collect_masks(model)
    off_total = 0
    for name, out in outputs.items():
        off = masks[name] == 0
        off_total += int(off.sum())
        assert (out[off] == 0).all()
    first = dp.gating_info(model).gated[0]  # its input is dense, so its kept channels are non-zero
    assert (outputs[first][masks[first] == 1].abs().sum(dim=(-1, -2)) > 0).all()
    assert off_total > 0


def test_gated_model_matches_dense_when_all_gates_open() -> None:
    dense = dp.backbones.create("resnet20")
    gated = dp.backbones.create("resnet20")
    gated.load_state_dict(dense.state_dict())
    dp.gate_model(gated, gate="sigmoid", init_bias=20.0)
    x = torch.randn(2, 1, 28, 28)
    dense.eval(), gated.eval()
    assert torch.allclose(dense(x), gated(x), atol=1e-5)
