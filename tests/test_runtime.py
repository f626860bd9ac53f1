"""dynprune.runtime: compiled models give the masked model's outputs while running only the kept compute."""

from __future__ import annotations

import copy
import csv
import functools
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Acceptance, assert_close_rounding, weight_depth
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.io import write_csv
from dynprune.runtime import CompiledModel, compile_for_inference
from dynprune.runtime.channels import ThinLayer
from dynprune.runtime.compile import compilable
from dynprune.runtime.decide import HardRule


def compile_untimed(model: nn.Module, *args, **kwargs) -> CompiledModel:
    """compile_for_inference without timing the dispatch paths (tests never time; both paths are checked)."""
    return compile_for_inference(model, *args, dispatch=(), **kwargs)


SCRIPT = Path(__file__).parent.parent / "experiments" / "bench_latency.py"
GRANULARITIES = dp.list_granularities()
SHAPE = (1, 16, 16)


def _randomise(model: nn.Module) -> nn.Module:
    """Random BN statistics and gate biases around 0, so folding matters and decisions differ per input."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
            if name.endswith("dynprune_gate"):
                m.fc2.bias.normal_(0, 0.5)
    return model.eval()


def _backbone(name: str) -> nn.Module:
    return dp.backbones.create(name, num_classes=10, in_chans=SHAPE[0], input_size=SHAPE[1])


def _gated(backbone: str, gate: str, granularity: str) -> nn.Module:
    return _randomise(dp.gate_model(_backbone(backbone), gate=gate, granularity=granularity))


# Only what gate_model accepts is compiled; what it refuses (a net without residual blocks has no block sites, a CNN
# no tokens) is checked to be refused, by name, in test_refusals_name_the_granularity.
ACCEPTANCE = Acceptance({name: functools.partial(_backbone, name) for name in dp.list_backbones()})
ACCEPTED, REFUSED = ACCEPTANCE.split([(b, gate, g) for b in dp.list_backbones() for gate in dp.list_gates()
                                      for g in GRANULARITIES])


def _force(models: list[nn.Module], decisions: dict[str, Tensor]) -> None:
    for model in models:
        gates = model.site_gates if hasattr(model, "site_gates") else dp.gates_of(model)
        for name, d in decisions.items():
            gates[name].force(d)


def _mixed(model: nn.Module, batch: int, seed: int) -> dict[str, Tensor]:
    """Random per-input decisions, of the shape each gate decides ((units,) per input or (T, units) per position),
    with one input keeping every unit and one keeping none (batch > 1)."""
    gen = torch.Generator().manual_seed(seed)
    info = dp.gating_info(model)
    with torch.no_grad():
        model(info.example)
    out = {}
    for name, mask in dp.collect_masks(model).items():
        d = (torch.rand(batch, *mask.shape[1:], generator=gen) < 0.5).float()
        if batch > 1:
            d[0], d[1] = 1.0, 0.0
        out[name] = d
    return out


@functools.cache
def _max_depth() -> int:
    """Conv and linear layers of the deepest registered backbone: a rounding depth that bounds every model here."""
    return max(weight_depth(dp.backbones.create(name, in_chans=SHAPE[0], input_size=SHAPE[1]))
               for name in dp.list_backbones())


def _close(a: Tensor, b: Tensor) -> None:
    assert_close_rounding(a, b, depth=_max_depth())


@pytest.mark.numerics
@pytest.mark.parametrize("backbone", dp.list_backbones())
def test_dense_model_folds_batchnorm_and_keeps_outputs(backbone: str) -> None:
    net = _randomise(dp.backbones.create(backbone, in_chans=1, input_size=16))
    compiled = compile_untimed(net)
    x = torch.randn(3, *SHAPE)
    _close(compiled(x), net(x))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(compiled.folded) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in compiled.modules())


@pytest.mark.parametrize(("backbone", "gate", "granularity"), ACCEPTED)
def test_compiled_equals_masked(backbone: str, gate: str, granularity: str) -> None:
    model = _gated(backbone, gate, granularity)
    if granularity not in compilable():  # a granularity the runtime cannot execute yet must say so
        with pytest.raises(NotImplementedError, match=granularity):
            compile_untimed(model)
        return
    compiled = compile_untimed(model)
    for batch in (1, 8):
        x = torch.randn(batch, *SHAPE)
        _close(compiled(x), model(x))  # the gates' own decisions
        _force([model, compiled], _mixed(model, batch, seed=batch))
        _close(compiled(x), model(x))
        _force([model, compiled], {n: None for n in compiled.site_gates})


def test_refusals_name_the_granularity() -> None:
    """Each combination gate_model refuses (listed once per reason) raises a ValueError naming the granularity."""
    assert REFUSED
    for backbone, gate, granularity in REFUSED:
        with pytest.raises(ValueError, match=f"granularity '{granularity}'"):
            dp.gate_model(_backbone(backbone), gate=gate, granularity=granularity)


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> project 1x1, plus the input (a whole residual block)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn_d = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn_p = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn_d(self.dw(F.relu(self.bn_e(self.expand(x))))))
        return F.relu(x + self.bn_p(self.project(y)))


class UserNet(nn.Module):
    """A net the library has never seen: a residual block with a depthwise conv, a grouped conv, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = InvertedResidual(8, 16)
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        x = F.relu(self.conv(F.relu(self.grouped(x))))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.numerics
@pytest.mark.parametrize("granularity", ["channel", "block", "block+channel"])
def test_user_model_with_residual_grouped_and_depthwise_convs(granularity: str) -> None:
    model = UserNet()
    model.input_shape = SHAPE
    for g in granularity.split("+"):
        model = dp.gate_model(model, gate="sigmoid", granularity=g)
    model = _randomise(model)
    compiled = compile_untimed(model)
    net = compiled.net
    if granularity == "channel":  # conv -> flatten -> linear and expand -> depthwise run thin
        assert isinstance(net.fc1, ThinLayer) and net.fc1.source is net.conv and net.fc1.gate is not None
        assert net.block.dw.source is net.block.expand and not net.block.expand.scatter
        assert not net.conv.scatter and net.grouped.gate is not None
    for batch in (1, 8):
        x = torch.randn(batch, *SHAPE)
        _close(compiled(x), model(x))
        _force([model, compiled], _mixed(model, batch, seed=batch))
        _close(compiled(x), model(x))


def _flops(model: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


# Neuron sites run the union of their tokens' units when an input has several tokens: that count is checked
# in tests/test_neuron_runtime.py (and the per-token count at a single token).
@pytest.mark.parametrize(("backbone", "granularity"),
                         [(b, g) for b in dp.list_backbones() for g in compilable()
                          if g != "neuron" and ACCEPTANCE.refusal(b, "sigmoid", g) is None])
def test_nothing_is_simulated(backbone: str, granularity: str) -> None:
    """FlopCounterMode over the compiled model at batch 1 counts the reported effective FLOPs of that input plus
    the reported FLOPs of its gates (a token gate's on the tokens still kept): the runtime executes exactly the
    kept compute (own and forced decisions)."""
    model = _gated(backbone, "sigmoid", granularity)
    compiled = compile_untimed(model)
    info = dp.gating_info(model)
    x = torch.randn(1, *SHAPE)
    for decisions in (None, _mixed(model, 1, seed=3), _mixed(model, 1, seed=4)):
        if decisions is not None:
            _force([model, compiled], decisions)
        _close(compiled(x), model(x))
        masks = dp.collect_masks(model)
        expected = info.flops.effective(masks).item()
        assert _flops(compiled, x) == pytest.approx(expected + info.flops.gates(masks).item(), rel=1e-6)
    assert expected < 0.9 * info.flops.dense_total  # the forced decisions skip work


def test_block_execution_runs_only_the_sub_batch() -> None:
    model = _gated("resnet20", "sigmoid", "block")
    compiled = compile_untimed(model)
    x = torch.randn(8, *SHAPE)
    sites = dp.gating_info(model).sites
    runs = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float)[:, None]
    _force([model, compiled], dict.fromkeys(sites, runs))
    _close(compiled(x), model(x))
    dense, ran = _flops(model, x), _flops(compiled, x)
    assert ran < 0.5 * dense  # 2 of 8 inputs run each gated block


@pytest.mark.parametrize("backbone", ["resnet20", "vgg11"])
def test_zero_size_cases(backbone: str) -> None:
    for granularity in ("channel", "block") if backbone == "resnet20" else ("channel",):
        model = _gated(backbone, "sigmoid", granularity)
        compiled = compile_untimed(model)
        sites = dp.gating_info(model).sites
        for batch in (1, 8):
            x = torch.randn(batch, *SHAPE)
            off = {name: torch.zeros(batch, site.units) for name, site in sites.items()}
            _force([model, compiled], off)  # every channel of every gated layer off / no input runs any block
            _close(compiled(x), model(x))
    conv = nn.Conv2d(4, 6, 3, padding=1)
    gate = dp.create_gate("sigmoid", 4, 6).eval().force(torch.zeros(6))
    producer = ThinLayer(conv, gate, None, scatter=False)
    consumer = ThinLayer(nn.Conv2d(6, 5, 3, stride=2, padding=1), None, producer, scatter=False)
    y = producer(torch.randn(2, 4, 8, 8))  # no kept channel: one all-zero channel stands for them
    assert y.shape == (2, 1, 8, 8) and not y.any() and producer.kept.tolist() == [0]
    z = consumer(F.max_pool2d(y, 1))  # pooling refuses zero-width tensors
    assert z.shape == (2, 5, 4, 4)
    assert torch.equal(z, consumer.layer.bias.view(1, 5, 1, 1).expand(2, 5, 4, 4))  # the bias alone


@pytest.mark.numerics
def test_static_pruned_model_compiles_to_the_same_outputs() -> None:
    net = _randomise(dp.backbones.create("resnet20", in_chans=1, input_size=16))
    small = dp.static.remove_channels(dp.static.prune_model(net, "l1_structured", 0.5))
    compiled = compile_untimed(small, SHAPE)
    x = torch.randn(4, *SHAPE)
    _close(compiled(x), net(x))
    assert compiled.net.layer1[0].conv1.out_channels == 8


def test_compiled_model_is_eval_only() -> None:
    compiled = compile_untimed(_randomise(dp.backbones.create("lenet5", in_chans=1, input_size=16)))
    with pytest.raises(ValueError, match="eval-only"):
        compiled.train()


def test_smoke_benchmark_writes_the_table(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_latency", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = bench
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path / "bench")])
    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    forms = {r["form"] for r in rows}
    assert {"dense", "masked channel", "compiled channel", "compiled block", "static_l1", "uniform"} <= forms
    assert {int(r["batch"]) for r in rows} == {1, 4}
    for r in rows:
        theoretical = float(r["theoretical"])
        assert theoretical == 1.0 if r["form"] == "dense" else 1.6 < theoretical < 2.5, r
        assert float(r["ratio"]) == pytest.approx(float(r["achieved"]) / theoretical)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "Self CPU" in (tmp_path / "bench_profile.txt").read_text()


def test_pareto_draws_accuracy_against_measured_latency(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pareto_latency", SCRIPT.with_name("pareto.py"))
    pareto = importlib.util.module_from_spec(spec)
    sys.modules["pareto_latency"] = pareto
    spec.loader.exec_module(pareto)
    rows = [{"run": "a", "method": "sigmoid", "acc": 0.90, "flops_mean_ratio": 0.4, "latency_ms": 3.0},
            {"run": "b", "method": "sigmoid", "acc": 0.92, "flops_mean_ratio": 0.5, "latency_ms": 2.0},
            {"run": "c", "method": "sigmoid", "acc": 0.95, "flops_mean_ratio": 0.9}]
    write_csv(tmp_path / "summary.csv", rows)
    points = pareto.read_summary(tmp_path / "summary.csv")
    assert pareto.pareto_front(points) == [0, 1, 2]  # by FLOPs every run is on the front
    assert pareto.pareto_front(points[:2], "latency") == [1]  # b is faster and more accurate than a
    pareto.main([str(tmp_path / "summary.csv"), "--x", "latency", "--out", str(tmp_path / "lat")])
    table = (tmp_path / "lat.md").read_text()
    assert "| sigmoid | – | 92.00 | 0.500 |" in table and "95.00" not in table  # c has no latency: left out
    assert (tmp_path / "lat.png").read_bytes()[:4] == b"\x89PNG"


def test_width_layers_run_a_prefix_of_their_weights() -> None:
    """Every input at the smallest width: each narrowed layer computes ceil(0.25 C) channels, taken as a view
    of its weight (no gather), and the output still equals the masked model's."""
    from dynprune.runtime.channels import _take

    weight = torch.randn(8, 3)
    assert _take(weight, torch.arange(3)).data_ptr() == weight.data_ptr()  # a prefix: a view
    assert torch.equal(_take(weight, torch.tensor([0, 2])), weight[[0, 2]])
    model = _gated("resnet20", "sigmoid", "width")
    compiled = compile_untimed(model)
    sites = dp.gating_info(model).sites
    smallest = {n: torch.zeros(1, s.units) for n, s in sites.items()}
    _force([model, compiled], smallest)
    x = torch.randn(1, *SHAPE)
    _close(compiled(x), model(x))
    narrowed = [(name, layer, expand, s.units) for name, s in sites.items() for layer, expand in s.expanders.items()]
    assert narrowed
    for name, layer, expand, units in narrowed:  # the block is wrapped: its layers sit under `.block`
        executor = compiled.net.get_submodule(f"{name}.block.{layer.removeprefix(name + '.')}")
        assert isinstance(executor, ThinLayer)
        k = int(expand(torch.zeros(1, units)).sum())
        assert k < expand.channels and executor.kept is not None and executor.kept.tolist() == list(range(k))


def test_thin_layer_gathers_each_mask_once_within_its_budget() -> None:
    """Repeated masks reuse one packed weight (no gather per call); the cache stays within its budget and a
    cast drops it (packs were gathered from the old weights)."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    gate = dp.create_gate("sigmoid", 4, 6).eval()
    layer = ThinLayer(conv, gate, None, scatter=False)
    x = torch.randn(1, 4, 8, 8)
    masks = [torch.tensor([[1.0, 0, 1, 0, 0, 1]]), torch.tensor([[0.0, 1, 1, 1, 0, 0]])]
    for mask in masks + masks:
        gate.force(mask)
        keep = mask[0].nonzero().flatten()
        assert_close_rounding(layer(x), F.conv2d(x, conv.weight[keep], conv.bias[keep], padding=1))
    assert len(layer.packs) == 2
    first = next(iter(layer.packs.values())).weight
    gate.force(masks[1])
    layer(x)
    assert next(iter(layer.packs.values())).weight is first  # least recently used first
    layer.cache_factor = 0.6  # room for one pack of 3 of 6 rows
    gate.force(torch.tensor([[1.0, 1, 1, 0, 0, 0]]))
    layer(x)
    assert len(layer.packs) == 1 and layer.cached <= 0.6 * conv.weight.numel()
    layer.double()
    assert not layer.packs and layer(x.double()).dtype == torch.float64


@pytest.mark.parametrize("gate", dp.list_gates())
def test_compiles_right_after_a_training_step(gate: str) -> None:
    """A gate holds its last forward pass (the policy family its sampling distribution) inside the autograd
    graph; copying the model for compilation or as a teacher must not trip over it."""
    torch.manual_seed(0)
    model = dp.gate_model(dp.backbones.create("lenet5", 10, 1, 28), gate=gate, input_shape=(1, 28, 28))
    module = dp.GatedClassifier(model, gate=gate)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    module.train()
    F.cross_entropy(module(x), y).backward()
    compiled = compile_untimed(model.eval())
    _close(compiled(x), model(x))


@pytest.mark.parametrize(("widths", "channels"), [([0.25, 0.5, 0.75, 1.0], 16), ([0.25, 0.5, 0.75, 1.0], 2),
                                                  ([0.3, 0.6, 1.0], 7)])
def test_width_slot_indexes_the_prefix_mask_of_each_level(widths: list[float], channels: int) -> None:
    """A width slot's per-level mask table gives ``PrefixMask(units) != 0`` for every pattern of nested units,
    also where several levels share a bound (2 channels at 4 widths)."""
    from dynprune.hooks import PrefixMask
    from dynprune.runtime.widths import WidthSlot

    expander = PrefixMask(widths, channels)
    slot = WidthSlot(expander)
    k = len(widths) - 1
    units = torch.tensor([[(i >> j) & 1 for j in range(k)] for i in range(2 ** k)], dtype=torch.float)
    slot.level = (units != 0).long().cumprod(dim=1).sum(dim=1)
    assert torch.equal(slot.mask(), expander(units) != 0)


@pytest.mark.parametrize("gate", dp.list_gates())
def test_hard_rule_is_the_family_threshold_bitwise(gate: str) -> None:
    """Every family's inference decision is its threshold on G(x); the runtime's HardRule (no sigmoid, stored W^T
    views) gives bitwise the gate's own hard decisions, also for scores placed exactly at the threshold."""
    g = dp.create_gate(gate, 12, 9).eval()
    pooled = torch.randn(5, 12)
    logits = g.logits(pooled)
    assert torch.equal(g.hard_decisions(logits) != 0, logits >= g.inference_threshold())
    rule = HardRule(g)
    assert torch.equal(rule(pooled), g(pooled) != 0)
    with torch.no_grad():  # move every score of input 0 exactly onto the threshold
        g.fc2.bias.sub_(logits[0] - g.inference_threshold())
    logits = g.logits(pooled)
    assert torch.equal(HardRule(g)(pooled), g.hard_decisions(logits) != 0)


def test_build_checks_leave_no_packs_behind() -> None:
    """The forced masks the build checks run are not cached: the first real calls find room for their own."""
    compiled = compile_untimed(_gated("resnet20", "sigmoid", "channel"))
    layers = [m for m in compiled.modules() if isinstance(m, ThinLayer)]
    assert layers and all(not m.packs and m.cached == 0 for m in layers)
    compiled(torch.randn(1, *SHAPE))
    assert any(m.packs for m in layers)


def test_gate_rules_follow_their_own_gate_weights() -> None:
    """A compiled gate's rule reads its gate's weights in place (an in-place edit takes effect), and a deep copy's
    rules read the copy's gates, not the original's."""
    compiled = compile_untimed(_gated("resnet20", "sigmoid", "channel"))
    twin = copy.deepcopy(compiled)
    x = torch.randn(2, *SHAPE)
    expected = twin(x)
    _close(compiled(x), expected)
    with torch.no_grad():
        for gate in compiled.site_gates.values():
            gate.fc2.bias.fill_(-1e4)  # every gated channel off in the original only
    assert not torch.allclose(compiled(x), expected)
    assert torch.equal(twin(x), expected)


@pytest.mark.parametrize("float64_too", [False, True])
def test_own_decisions_that_differ_only_in_float32_are_rounding_and_warn(
        monkeypatch: pytest.MonkeyPatch, float64_too: bool) -> None:
    """Where the compiled and masked models differ with the gates' own decisions, the build check repeats that
    trial on float64 copies: agreeing there, the float32 difference was scores within rounding of a threshold (a
    warning); differing there too, the compiled model decides wrongly (an error). The forced-decision trials still
    run in float32 either way."""
    forward = CompiledModel.forward

    def off_with_own_decisions(self: CompiledModel, x: Tensor) -> Tensor:  # what a flipped decision does
        out = forward(self, x)
        own = all(g.forced is None for g in self.site_gates.values())
        if own and (float64_too or out.dtype == torch.float32):
            return out + 1.0
        return out

    monkeypatch.setattr(CompiledModel, "forward", off_with_own_decisions)
    model = _gated("resnet20", "sigmoid", "channel")
    if float64_too:
        with pytest.raises(RuntimeError, match="with the gates' decisions .*in float64 too, so not by rounding"):
            compile_untimed(model)
    else:
        with pytest.warns(UserWarning, match="differs from the masked model in float32 .* agrees in float64"):
            compiled = compile_untimed(model)
        assert next(compiled.parameters()).dtype == torch.float32  # the float64 copies were only for the check


def test_an_ungated_model_that_differs_in_float32_is_an_error_not_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gates there are no decisions that rounding could flip: a float32-only difference of a dense model is
    an error, never rechecked in float64 and let through with a warning."""
    forward = CompiledModel.forward

    def off_in_float32(self: CompiledModel, x: Tensor) -> Tensor:
        out = forward(self, x)
        return out + 1.0 if out.dtype == torch.float32 else out

    monkeypatch.setattr(CompiledModel, "forward", off_in_float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="compiled model differs from the original by 1"):
            compile_untimed(_randomise(dp.backbones.create("resnet20", in_chans=1, input_size=16)))
    assert not [w for w in caught if "float64" in str(w.message)]  # no recheck, no rounding warning
