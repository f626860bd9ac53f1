"""gate_model on library and user-defined models: placement, residual handling, exact zeros, block
skipping, and models written the way model zoos write them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rounding, weight_depth
from torch import Tensor, nn

import dynprune as dp
from dynprune.inject import plan_sites


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
    assert type(model.a) is nn.Conv2d and type(model.a_bn) is nn.BatchNorm2d  # modules keep their type
    assert info.sites["a"].norm == "a_bn" and "residual" in info.skipped["b"]
    assert info.layers["b"].residual and info.layers["grouped"].producer == "a"
    assert info.bypassed == ["a", "grouped"]  # both feed the residual branch through b
    out = model.train()(torch.randn(2, 3, 12, 12))
    out.sum().backward()
    assert model.grouped.dynprune_gate.fc2.weight.grad.abs().sum() > 0


def test_where_patterns_and_errors() -> None:
    model = dp.gate_model(dp.backbones.create("resnet20"), gate="l1", where=["layer3.*"])
    assert dp.gating_info(model).gated == ["layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"]
    with pytest.raises(ValueError, match="cannot gate 'layer1.0.conv2'.*residual"):
        dp.gate_model(dp.backbones.create("resnet20"), where=["layer1.0.conv2"])
    with pytest.raises(ValueError, match="match no module"):
        dp.gate_model(dp.backbones.create("resnet20"), where=["nothing*"])
    with pytest.raises(ValueError, match="already gated at granularity 'channel'"):
        dp.gate_model(model)
    with pytest.raises(ValueError, match="input_shape"):
        dp.gate_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)))
    with pytest.raises(ValueError, match="nothing to gate"):
        dp.gate_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown granularity 'blocks'; choose one of: block, channel"):
        dp.gate_model(dp.backbones.create("resnet20"), granularity="blocks")


def test_masked_channels_are_exactly_zero_at_eval() -> None:
    model = dp.gate_model(dp.backbones.create("vgg11", width_mult=0.25), gate="sigmoid")
    for gate in dp.gates_of(model).values():  # random decisions instead of all-open gates
        nn.init.normal_(gate.fc2.bias, 0.0, 2.0)
    outputs = {}
    for name, site in dp.gating_info(model).sites.items():
        model.get_submodule(site.norm).register_forward_hook(
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


@pytest.mark.numerics
@pytest.mark.parametrize("granularity", ["channel", "block"])
def test_gated_model_matches_dense_when_all_gates_open_and_keeps_state_dict_keys(granularity: str) -> None:
    dense = dp.backbones.create("resnet20")
    gated = dp.gate_model(copy.deepcopy(dense), gate="sigmoid", granularity=granularity, init_bias=20.0)
    missing, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".dynprune_gate." in k for k in missing)
    x = torch.randn(2, 1, 28, 28)
    dense.eval(), gated.eval()
    assert_close_rounding(gated(x), dense(x), depth=weight_depth(dense))
    with dp.gates_disabled(gated):
        assert torch.equal(dense(x), gated(x))


def test_deepcopy_gives_an_independent_gated_model() -> None:
    model = dp.gate_model(dp.backbones.create("resnet20", width_mult=0.5), gate="sigmoid")
    twin = copy.deepcopy(model)
    for gate in dp.gates_of(twin).values():
        nn.init.constant_(gate.fc2.bias, -20.0)  # the copy closes every gate, the original must not
    x = torch.randn(2, 1, 28, 28)
    model.eval(), twin.eval()
    model(x), twin(x)
    assert all(m.all() for m in dp.collect_masks(model).values())
    assert not any(m.any() for m in dp.collect_masks(twin).values())


# --- block granularity -----------------------------------------------------------------------------

class Blocky(nn.Module):
    """A residual branch, a whole block and a stage-changing block, written as a user would."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.block = Residual(8)
        self.down = Down(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.branch(x)
        x = self.down(self.block(x))
        return self.head(x.mean((2, 3)))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv(x))


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1)
        self.proj = nn.Conv2d(cin, cout, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.proj(x)


@pytest.mark.numerics
def test_block_skipping_on_a_user_model() -> None:
    torch.manual_seed(0)
    dense = Blocky().eval()
    gated = dp.gate_model(copy.deepcopy(dense), "sigmoid", granularity="block", where=["branch", "block"],
                          input_shape=(1, 8, 8)).eval()
    sites = dp.gating_info(gated).sites
    assert {n: s.kind for n, s in sites.items()} == {"branch": "branch", "block": "whole"}
    x = torch.randn(3, 1, 8, 8)
    for gate in dp.gates_of(gated).values():
        gate.force(torch.ones(1))
    assert_close_rounding(gated(x), dense(x), depth=weight_depth(dense))
    for gate in dp.gates_of(gated).values():
        gate.force(torch.zeros(1))
    h = F.relu(dense.stem(x))  # branch deleted, block replaced by identity
    expected = dense.head(dense.down(h).mean((2, 3)))
    assert_close_rounding(gated(x), expected, depth=weight_depth(dense))
    with pytest.raises(ValueError, match="cannot gate 'down'.*stage-changing"):
        dp.gate_model(Blocky(), granularity="block", where=["down"], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="cannot gate 'stem'.*cut the network"):
        dp.gate_model(Blocky(), granularity="block", where=["stem"], input_shape=(1, 8, 8))
    default = dp.gate_model(Blocky(), granularity="block", input_shape=(1, 8, 8))
    assert dp.gating_info(default).gated == ["block"]  # whole blocks with one addition, not stage-changing


def test_block_and_channel_flops_compose() -> None:
    model = dp.backbones.create("resnet20", width_mult=0.5)
    dp.gate_model(model, "sigmoid", granularity="block")
    dp.gate_model(model, "sigmoid", granularity="channel")
    info = dp.gating_info(model)
    assert info.granularities == ["block", "channel"]
    _, per_module = dp.count_flops(dp.backbones.create("resnet20", width_mult=0.5), (1, 28, 28))
    ones = {n: torch.ones(1, s.units) for n, s in info.sites.items()}
    assert info.flops.effective(ones).item() == info.flops.dense_total
    off = dict(ones, **{"layer1.1": torch.zeros(1, 1)})
    assert info.flops.effective(off).item() == info.flops.dense_total - per_module["layer1.1"]
    half = dict(off, **{"layer1.1.conv1": torch.tensor([[1.0] * 4 + [0.0] * 4])})  # inside the skipped block
    assert info.flops.effective(half).item() == info.flops.dense_total - per_module["layer1.1"]


# --- models written the way model zoos write them ---------------------------------------------------

class SamePadConv(nn.Module):
    """TF-style 'same' padding: forward reads the conv's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    @staticmethod
    def pad_same(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        k, s = conv.kernel_size[0], conv.stride[0]
        total = max(k - s, 0) if x.shape[-1] % s == 0 else max(k - x.shape[-1] % s, 0)
        return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(self.pad_same(x, self.stem)))
        assert isinstance(self.conv, nn.Conv2d)
        x = F.relu(self.bn(self.conv(self.pad_same(x, self.conv))))
        return self.head(x.mean((2, 3)))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, then Linear layers on (N, H, W, C) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.pw1 = nn.Linear(8, 32)
        self.pw2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(h))).permute(0, 3, 1, 2)
        return self.head((x + h).mean((2, 3)))


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(self.conv(F.relu(self.stem(x)))))
        return self.head(F.relu(self.mid(x)).mean((2, 3)))


@pytest.mark.numerics
@pytest.mark.parametrize("net", [SamePadConv, ChannelsLastBlock])
def test_zoo_style_models_gate_correctly(net: type[nn.Module]) -> None:
    torch.manual_seed(0)
    dense = net().eval()
    gated = dp.gate_model(copy.deepcopy(dense), "sigmoid", input_shape=(1, 9, 9), init_bias=20.0).eval()
    assert dp.gating_info(gated).gated  # something was gated
    x = torch.randn(2, 1, 9, 9)
    assert_close_rounding(gated(x), dense(x), depth=weight_depth(dense))
    for gate in dp.gates_of(gated).values():
        nn.init.normal_(gate.fc2.bias, 0.0, 2.0)
    gated.train()(x).sum().backward()  # random masks: shapes still agree, gradients reach the gates
    assert any(g.fc2.weight.grad is not None for g in dp.gates_of(gated).values())


def test_channels_last_linear_is_masked_on_its_last_dim() -> None:
    model = dp.gate_model(ChannelsLastBlock(), "sigmoid", where=["pw1"], input_shape=(1, 6, 6)).eval()
    site = dp.gating_info(model).sites["pw1"]
    assert site.channel_dim == -1 and site.units == 32
    keep = torch.zeros(32)
    keep[:5] = 1
    model.pw1.dynprune_gate.force(keep)
    seen = {}
    model.pw1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model(torch.randn(2, 1, 6, 6))
    assert seen["out"].shape[-1] == 32 and (seen["out"][..., 5:] == 0).all() and (seen["out"][..., :5] != 0).any()


def test_reused_module_half_precision_and_bad_shapes_are_explained() -> None:
    with pytest.warns(UserWarning, match=r"called several times.*\['conv'\]"):
        model = dp.gate_model(Reused(), input_shape=(1, 6, 6))
    assert dp.gating_info(model).gated == ["mid"]
    with pytest.raises(ValueError, match="cannot gate 'conv'.*called 2 times"):
        dp.gate_model(Reused(), where=["conv"], input_shape=(1, 6, 6))
    with pytest.raises(ValueError, match="float32.*float16"):
        dp.gate_model(dp.backbones.create("resnet20").half())
    with pytest.raises(ValueError, match=r"does not accept input of shape \(N, 8, 8\)"):
        dp.gate_model(dp.backbones.create("resnet20"), input_shape=(8, 8))
    with pytest.raises(ValueError, match="positive ints"):
        dp.gate_model(dp.backbones.create("resnet20"), input_shape=(1, -28, 28))


REDUCTIONS = {"mean_hw": (lambda x: x.mean((2, 3)), True), "amax_then_sum": (lambda x: x.amax(dim=-1).sum(-1), True),
              "mean_channels": (lambda x: x.mean(1).flatten(1), False), "sum_all": (lambda x: x.sum(), False)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_trace_follows_a_reduction_that_keeps_the_channels(reduction: str) -> None:
    """Global pooling written as a reduction keeps the conv's channels: the classifier reads them (its FLOPs follow
    the conv's mask); reducing the channels themselves, or everything, does not."""
    reduce, follows = REDUCTIONS[reduction]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.LazyLinear(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(reduce(self.conv(x)).reshape(len(x), -1))

    net = Net()
    net(torch.zeros(1, 1, 6, 6))
    info = dp.gate_model(net, "sigmoid", where=["conv"], input_shape=(1, 6, 6)).dynprune
    assert (info.layers["fc"].producer == "conv") is follows
    gate = dp.gates_of(net)["conv"].force(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]))
    with torch.no_grad():
        net(torch.randn(1, 1, 6, 6))
    fc = info.flops.per_layer(dp.collect_masks(net))["fc"].item()
    dense = next(lay.dense for lay in info.flops.layers if lay.name == "fc")
    assert fc == pytest.approx(dense * (3 / 8 if follows else 1.0), rel=1e-6) and gate.mask.sum() == 3


def test_plan_sites_is_a_dry_run_of_gate_model() -> None:
    net = dp.backbones.create("resnet20", in_chans=1, input_size=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = plan_sites(net, granularity="block")
    assert not hasattr(net, "dynprune") and not any("dynprune_gate" in n for n, _ in net.named_modules())
    assert net.state_dict().keys() == before.keys() and all(torch.equal(net.state_dict()[k], v)
                                                            for k, v in before.items())
    assert plan.sites == dp.gating_info(dp.gate_model(net, granularity="block")).gated
    vgg = dp.backbones.create("vgg11", in_chans=1, input_size=8)
    with pytest.raises(ValueError, match="nothing to gate at granularity 'block'"):
        plan_sites(vgg, granularity="block")
    vit = dp.backbones.create("vit", in_chans=1, input_size=8, width_mult=0.25, depth_mult=0.34)
    with pytest.raises(ValueError, match="gate 'policy' cannot decide at granularity 'token'"):
        plan_sites(vit, gate="policy", granularity="token")
