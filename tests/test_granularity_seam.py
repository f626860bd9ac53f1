"""The granularity seam from outside the package: a granularity defined in this file trains through
GatedClassifier with FLOPs equal to those of the physically thinned model, and the runtime refuses it by
name; per-token decisions on an (N, T, D) model have FLOPs equal to FlopCounterMode's count of the
physically pruned computation (linear in kept neurons, quadratic in kept tokens); no code outside
``dynprune/granularity/`` (``dynprune/gates/``) names a granularity (a gate family)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer_kwargs
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import dynprune as dp
from dynprune.granularity import (
    GRANULARITIES,
    FlopsTerms,
    Granularity,
    ModuleGranularity,
    Site,
    layout_of,
    register_granularity,
)
from dynprune.granularity.base import add_gate
from dynprune.hooks import DecideHook, HookSwitch, MaskHook
from dynprune.runtime import compile_for_inference
from dynprune.trace import Trace

PACKAGE = Path(dp.__file__).parent
GROUP = 4


class Groups:
    """Decisions (N, C / GROUP) -> channel mask (N, C): each unit keeps GROUP adjacent channels."""

    def __call__(self, units: Tensor) -> Tensor:
        return units.repeat_interleave(GROUP, dim=-1)


class GroupGranularity(Granularity):
    """Out-of-tree: one decision per group of GROUP output channels of a conv/linear layer (no executor)."""

    name = "group4"

    def candidates(self, trace: Trace) -> list[str]:
        return list(trace.layers)

    def ineligible(self, trace: Trace, name: str) -> str | None:
        info = trace.layers[name]
        return None if info.out_channels % GROUP == 0 and not info.residual else "not a whole number of groups"

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n in list(trace.layers)[:-1] if self.ineligible(trace, n) is None]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.layers[name]
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels // GROUP, gate_kwargs)
        model.get_submodule(name).register_forward_pre_hook(DecideHook(switch, net))
        model.get_submodule(info.norm or name).register_forward_hook(MaskHook(switch, net, 1, Groups()))
        return Site(name, self, info.out_channels // GROUP, (name,), gate_path=path)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={site.name: Groups()(mask)})


class TokenNeurons(Granularity):
    """Out-of-tree: per token, which hidden units of a Linear on (N, T, D) run (decisions (N, T, units))."""

    name = "token_neurons"

    def candidates(self, trace: Trace) -> list[str]:
        return list(trace.layers)

    def ineligible(self, trace: Trace, name: str) -> str | None:
        return None if len(trace.modules[name].in_shape) == 2 else "not a Linear on tokens (N, T, D)"

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return [n for n in trace.layers if self.ineligible(trace, n) is None][:1]

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.layers[name]
        layout = layout_of(trace.modules[name].in_shape, "tokens", per_position=True)
        net, path = add_gate(model, name, gate, info.in_channels, info.out_channels, gate_kwargs, layout)
        model.get_submodule(name).register_forward_pre_hook(DecideHook(switch, net))
        model.get_submodule(name).register_forward_hook(MaskHook(switch, net, -1))
        return Site(name, self, info.out_channels, (name,), layout, gate_path=path)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(masks={site.name: mask})


class TokenKeep(ModuleGranularity):
    """Out-of-tree: per token, whether a token mixer (attention-like, no layer inside) sees it; its cost is
    quadratic in the kept tokens."""

    name = "token_keep"

    def ineligible(self, trace: Trace, name: str) -> str | None:
        return self.module_problem(trace, name)

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        return []

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        info = trace.modules[name]
        layout = layout_of(info.in_shape, per_position=True)
        net, path = add_gate(model, name, gate, layout.features(info.in_shape), 1, gate_kwargs, layout)
        model.get_submodule(name).register_forward_pre_hook(DecideHook(switch, net))
        model.get_submodule(name).register_forward_hook(MaskHook(switch, net, -1, KeepTokens(info.out_shape[-1])))
        return Site(name, self, 1, (), layout, gate_path=path)

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        return FlopsTerms(scale={site.name: mask.flatten(1).mean(1).square()})


class KeepTokens:
    """Per-token decisions (N, T, 1) -> a mask (N, T, D) that zeroes the features of dropped tokens."""

    def __init__(self, features: int) -> None:
        self.features = features

    def __call__(self, units: Tensor) -> Tensor:
        return units.expand(*units.shape[:-1], self.features)


@pytest.fixture
def registered() -> Iterator[None]:
    """The out-of-tree granularities, registered for one test."""
    for cls in (GroupGranularity, TokenNeurons, TokenKeep):
        register_granularity(cls.name)(cls)
    try:
        yield
    finally:
        for cls in (GroupGranularity, TokenNeurons, TokenKeep):
            GRANULARITIES.unregister(cls.name)


class SmallCNN(nn.Module):
    """conv-bn-relu x 2, global pool, fc: on (N, 1, 8, 8) digits."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())).relu()
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def thinned(model: SmallCNN, keep1: Tensor, keep2: Tensor) -> SmallCNN:
    """A copy of ``model`` with only the channels ``keep1`` of conv1 and ``keep2`` of conv2, physically."""
    thin = SmallCNN()
    thin.conv1 = nn.Conv2d(1, len(keep1), 3, padding=1)
    thin.bn1 = nn.BatchNorm2d(len(keep1))
    thin.conv2 = nn.Conv2d(len(keep1), len(keep2), 3, padding=1)
    thin.bn2 = nn.BatchNorm2d(len(keep2))
    thin.fc = nn.Linear(len(keep2), 10)
    with torch.no_grad():
        thin.conv1.weight.copy_(model.conv1.weight[keep1])
        thin.conv1.bias.copy_(model.conv1.bias[keep1])
        thin.conv2.weight.copy_(model.conv2.weight[keep2][:, keep1])
        thin.conv2.bias.copy_(model.conv2.bias[keep2])
        thin.fc.weight.copy_(model.fc.weight[:, keep2])
        thin.fc.bias.copy_(model.fc.bias)
        for src, dst, keep in ((model.bn1, thin.bn1, keep1), (model.bn2, thin.bn2, keep2)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, name).copy_(getattr(src, name)[keep])
    return thin.eval()


def test_an_out_of_tree_granularity_trains_with_the_flops_of_the_thinned_model(registered: None) -> None:
    """Groups of 4 channels decided as one unit: trains through GatedClassifier (the gates and the weights move);
    per input, the reported FLOPs equal FlopCounterMode's count of the model with those channels removed and
    the outputs equal that model's; the runtime refuses the granularity by name."""
    L.seed_everything(0)
    module = dp.GatedClassifier(SmallCNN(), gate="sigmoid", granularity="group4", input_size=8, lam=0.3,
                                gate_kwargs={"init_bias": 1.0})
    gates = dp.gates_of(module.model)
    assert {n: g.fc2.out_features for n, g in gates.items()} == {"conv1": 4, "conv2": 2}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=20, limit_val_batches=0, **quiet_trainer_kwargs())
    trainer.fit(module, dp.DigitsDataModule(batch_size=64))
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert "conv1.dynprune_gate.fc2.weight" in moved and "conv2.weight" in moved
    assert 0 < float(trainer.callback_metrics["train/flops_ratio"]) <= 1
    model = module.model.eval()
    profile = dp.gating_info(model).flops
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    patterns = [([1, 0, 1, 1], [0, 1]), ([0, 0, 0, 1], [1, 1]), ([1, 1, 1, 1], [1, 0])]
    for i, (g1, g2) in enumerate(patterns):
        gates["conv1"].force(torch.tensor(g1, dtype=torch.float))
        gates["conv2"].force(torch.tensor(g2, dtype=torch.float))
        with torch.no_grad():
            out = model(x[i:i + 1])
        masks = dp.collect_masks(model)
        keep1 = Groups()(masks["conv1"])[0].nonzero().flatten()
        keep2 = Groups()(masks["conv2"])[0].nonzero().flatten()
        thin = thinned(model, keep1, keep2)
        assert profile.effective(masks).item() == pytest.approx(dp.count_flops(thin, (1, 8, 8))[0], rel=1e-6)
        torch.testing.assert_close(out, thin(x[i:i + 1]), rtol=1e-4, atol=1e-5 * float(out.abs().max()))
    for g in gates.values():
        g.force(None)
    with pytest.raises(NotImplementedError, match=r"cannot compile granularity \['group4'\].*compilable: block"):
        compile_for_inference(model)


class Mixer(nn.Module):
    """Attention-like token mixing without weights: softmax(x x^T / sqrt(D)) x, on (N, T, D)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x @ x.transpose(1, 2) / x.shape[-1] ** 0.5).softmax(-1) @ x


class TokenModel(nn.Module):
    """Token ids (N, T) -> embedding -> mixer -> residual per-token MLP -> mean over tokens -> logits."""

    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embed, self.mixer = nn.Embedding(vocab, dim), Mixer()
        self.fc1, self.fc2, self.head = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, 3)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.mixer(self.embed(ids))
        x = x + self.fc2(self.fc1(x).relu())
        return self.head(x.mean(1))


def test_per_token_decisions_count_the_flops_of_the_pruned_computation(registered: None) -> None:
    """Integer token ids; a per-token neuron site (decisions (N, T, 16)) and a per-token keep site on the mixer
    (decisions (N, T, 1), cost quadratic in kept tokens): the profile's FLOPs for one input equal
    FlopCounterMode's count of the computation that skips the dropped neurons and tokens. With every token kept,
    the masked model's output is that computation's (a dropped token is only zeroed after the mixer here, so it
    still takes part in the mixing of the others: the FLOPs are those of dropping it)."""
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(0, 20, (1, 7))
    dp.gate_model(model, "sigmoid", granularity="token_neurons", example=ids)
    dp.gate_model(model, "sigmoid", granularity="token_keep", where=["mixer"], example=ids)
    gates = dp.gates_of(model)
    neurons = (torch.rand(1, 7, 16, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    gates["fc1"].force(neurons)
    profile = dp.gating_info(model).flops
    for tokens in (torch.ones(7), torch.tensor([1.0, 0, 1, 1, 0, 1, 0])):
        gates["mixer"].force(tokens.view(1, 7, 1))
        with torch.no_grad():
            out = model(ids)
        masks = dp.collect_masks(model)
        assert masks["fc1"].shape == (1, 7, 16) and masks["mixer"].shape == (1, 7, 1)
        kept = tokens.nonzero().flatten()
        with torch.no_grad(), dp.gates_disabled(model), FlopCounterMode(display=False) as counter:
            x = model.embed(ids)
            mixed = torch.zeros_like(x)
            mixed[:, kept] = model.mixer(x[:, kept])  # dropped tokens: never mixed, zero
            rows = []
            for t in range(7):  # each token runs its own kept neurons only
                keep = neurons[0, t].nonzero().flatten()
                h = F.linear(mixed[:, t], model.fc1.weight[keep], model.fc1.bias[keep]).relu()
                rows.append(F.linear(h, model.fc2.weight[:, keep], model.fc2.bias))
            ref = model.head((mixed + torch.stack(rows, 1)).mean(1))
        assert profile.effective(masks).item() == pytest.approx(counter.get_total_flops(), rel=1e-6)
        if len(kept) == 7:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert profile.dense_total == dp.count_flops(TokenModel(), ids)[0]


def test_module_gates_read_features_not_positions_of_token_inputs() -> None:
    """Block and width gates on an (N, T, D) block pool over the T tokens and read the D features."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.fc2(self.fc1(x).relu())

    for granularity in ("block", "width"):
        model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(6 * 9, 2))
        dp.gate_model(model, "sigmoid", granularity=granularity, input_shape=(9, 6), where=["0"])
        gate = dp.gates_of(model)["0"]
        assert gate.fc1.in_features == 6 and gate.channel_dim == -1
        with torch.no_grad():
            model(torch.randn(3, 9, 6))
        assert gate.mask.shape == (3, gate.fc2.out_features)


def test_a_language_model_is_gated_from_integer_token_ids() -> None:
    """The package's char GPT takes token ids: gated from an example of ids, its gates read the D features of
    (N, T, D) and its dense FLOPs are FlopCounterMode's on those ids."""
    model = dp.backbones.create_language_model("char_gpt", 11, 16, dim=16, depth=1, heads=2).eval()
    ids = torch.randint(0, 11, (1, 12))  # T = 12 tokens of D = 16 features
    dense = dp.count_flops(model, ids)[0]
    dp.gate_model(model, "sigmoid", example=ids)
    dp.gate_model(model, "sigmoid", granularity="block", where=["blocks.0"], example=ids)
    info = dp.gating_info(model)
    assert info.flops.dense_total == dense and info.flops.input_shape == (12,)
    assert {s.layout.name for s in info.sites.values()} == {"tokens"}
    assert all(g.fc1.in_features == 16 for g in dp.gates_of(model).values())
    with torch.no_grad():
        assert model(torch.randint(0, 11, (3, 12))).shape == (3, 12, 11)


def test_a_site_that_changes_no_counted_flops_has_a_zero_cost_share() -> None:
    """A branch that is only a BatchNorm (``layer1.0.bn2`` feeds the residual addition alone) is a block site
    without layers: its cost share is zeros (N,), so the policy family's per-site credit works."""
    model = dp.gate_model(dp.backbones.create("resnet20", input_size=8, width_mult=0.5), "policy",
                          granularity="block", where=["layer1.0", "layer1.0.bn2"])
    with torch.no_grad():
        model(torch.randn(3, 1, 8, 8))
    profile = dp.gating_info(model).flops
    shares = profile.site_costs(profile.per_layer(dp.collect_masks(model)))
    assert profile.dependents["layer1.0.bn2"] == [] and torch.equal(shares["layer1.0.bn2"], torch.zeros(3))
    assert profile.dependents["layer1.0"] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert bool((shares["layer1.0"] > 0).all())


def test_granularity_options_are_checked_and_not_gate_arguments() -> None:
    with pytest.raises(ValueError, match=r"granularity 'width' has no option\(s\) \['widht'\]; its options: widths"):
        dp.GatedClassifier("resnet20", granularity={"width": {"widht": [0.5, 1.0]}}, input_size=8, width_mult=0.5)
    with pytest.raises(ValueError, match=r"\['widths'\] are options of granularity 'width', not of gate 'sigmoid'"):
        dp.GatedClassifier("resnet20", granularity="width", gate_kwargs={"widths": [0.5, 1.0]}, input_size=8,
                           width_mult=0.5)
    module = dp.GatedClassifier("resnet20", granularity={"width": {"widths": [0.5, 1.0]}}, input_size=8,
                                width_mult=0.5)
    assert all(s.widths == [0.5, 1.0] and s.units == 1 for s in dp.gating_info(module.model).sites.values())


def test_granularity_options_from_the_cli(tmp_path: Path) -> None:
    from dynprune.cli import cli_main

    cli = cli_main(["fit", "--config", str(Path(__file__).parent / "conf" / "digits_sigmoid.yaml"),
                    "--model.granularity={width: {widths: [0.5, 1.0]}}", "--model.width_mult=0.5",
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    sites = dp.gating_info(cli.model.model).sites
    assert sites and all(s.widths == [0.5, 1.0] for s in sites.values())


def _named_literals(names: set[str], package: Path, home: str) -> list[str]:
    """'path:line name' for every place in ``package`` outside its folder ``home`` that branches on one of
    ``names`` or lists them: a comparison or membership test with the name (``== "width"``, ``in (...)``), a
    dict key or subscript, or a tuple/list/set holding two or more of them."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.is_relative_to(package / home):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else getattr(o, "elts", []))]
            elif isinstance(node, ast.Dict):
                consts = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.Subscript):
                consts = [node.slice]
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                listed = [e for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
                consts = listed if len(listed) > 1 else []
            else:
                continue
            found += [f"{path.relative_to(package.parent)}:{c.lineno} {c.value}" for c in consts
                      if isinstance(c, ast.Constant) and c.value in names]
    return sorted(set(found))


def test_no_granularity_name_outside_its_package() -> None:
    assert _named_literals(set(dp.list_granularities()), PACKAGE, "granularity") == []


def test_no_gate_family_name_outside_its_package() -> None:
    assert _named_literals(set(dp.list_gates()), PACKAGE, "gates") == []


def test_the_name_check_finds_a_branch_on_a_name(tmp_path: Path) -> None:
    """The check can fail: a comparison, a membership test and a list of names are found; a docstring, a
    default value, a lone assignment and the granularity's own folder are not."""
    (tmp_path / "pkg" / "granularity").mkdir(parents=True)
    source = ('def f(site, g="width"):\n    """width"""\n    return site.granularity == "width"\n'
              'OK = ("block", "channel")\nattr = "block"\nif attr in {"block"}:\n    pass\n')
    (tmp_path / "pkg" / "m.py").write_text(source)
    (tmp_path / "pkg" / "granularity" / "width.py").write_text('NAME = "width" == "width"\n')
    assert _named_literals({"width", "block", "channel"}, tmp_path / "pkg", "granularity") == [
        "pkg/m.py:3 width", "pkg/m.py:4 block", "pkg/m.py:4 channel", "pkg/m.py:6 block"]
