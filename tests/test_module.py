"""GatedClassifier: the sparsity objective works, REINFORCE has the right sign, args are checked."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rounding, quiet_trainer_kwargs, weight_depth
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynprune as dp
from dynprune import phases
from dynprune.cli import cli_main
from dynprune.gates import GATES, GateContext, PolicyGate, Rollout, SigmoidGate, register_gate
from dynprune.losses import distillation_loss
from dynprune.objective import Objective
from dynprune.phases import recalibrate_norms

CONF = Path(__file__).parent / "conf"


def _mean_keep(module: dp.GatedClassifier, dm: L.LightningDataModule) -> float:
    module.eval()
    keeps = []
    with torch.no_grad():
        for x, _ in dm.val_dataloader():
            module(x)
            keeps.append(torch.cat([m.mean(dim=1) for m in module.masks().values()]))
    return torch.cat(keeps).mean().item()


@pytest.mark.parametrize("gate", ["sigmoid", "l1"])
def test_lambda_lowers_keep_rate_on_digits(gate: str) -> None:
    keep = {}
    for lam in (0.0, 2.0):
        L.seed_everything(0)
        dm = dp.DigitsDataModule(batch_size=64)
        dm.setup()
        module = dp.GatedClassifier("resnet20", gate=gate, lam=lam, input_size=8, width_mult=0.5, lr=0.05,
                                    gate_kwargs={"init_bias": 1.0})
        L.Trainer(max_steps=250, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
        keep[lam] = _mean_keep(module, dm)
    assert keep[2.0] < keep[0.0] - 0.2, keep


class _Toy(nn.Module):
    """The gated layer ``mid`` does not influence the output: turning it off costs no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.input_shape = (4,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        unused = self.mid(h).sum(dim=1, keepdim=True)
        return self.head(h) + 0.0 * unused


class FlippedPolicy(PolicyGate):
    """An out-of-tree gate family (one class, registered by the test): REINFORCE with the sign of the
    well-known erratum, rewarding loss and cost instead of penalising them."""

    def training_loss(self, ctx: GateContext) -> torch.Tensor | None:
        def rollout() -> Rollout:
            greedy = ctx.rollout()
            return Rollout(-greedy.task_loss, {k: -v for k, v in greedy.site_costs.items()}, -greedy.cost)

        flipped = GateContext(-ctx.task_loss, -ctx.site_cost, rollout, ctx.progress, ctx.name, ctx.price)
        return super().training_loss(flipped)


@pytest.fixture
def flipped_family():
    register_gate("flipped_policy")(FlippedPolicy)
    yield "flipped_policy"
    GATES.unregister("flipped_policy")


def _train_toy(gate: str) -> float:
    L.seed_everything(0)
    model = dp.gate_model(_Toy(), gate=gate, init_bias=0.0, entropy=0.0)
    module = dp.GatedClassifier(model, lam=1.0, cost="count", num_classes=2, lr=0.5, gate_lr=0.5)
    x, y = torch.randn(512, 4), torch.randint(0, 2, (512,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    L.Trainer(max_epochs=15, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, loader)
    module.eval()
    with torch.no_grad():
        probs = module.model.mid.dynprune_gate.logits(F.relu(module.model.stem(x))).sigmoid()
    return probs.mean().item()


def test_reinforce_turns_off_a_useless_gate_and_an_out_of_tree_family_with_flipped_sign_does_not(
        flipped_family: str, tmp_path) -> None:
    assert _train_toy("policy") < 0.1
    assert _train_toy(flipped_family) > 0.9
    cli = cli_main(["fit", "--config", str(CONF / "digits_sigmoid.yaml"), "--model.gate", flipped_family,
                    "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                    f"--trainer.default_root_dir={tmp_path}", f"--flops.dirpath={tmp_path}", "--flops.plot=false"])
    assert all(isinstance(g, FlippedPolicy) for g in dp.gates_of(cli.model.model).values())


def test_objective_penalty_and_price() -> None:
    plain = Objective(lam=0.5)
    assert plain.penalty(torch.tensor(0.4)).item() == pytest.approx(0.2) and plain.price(torch.tensor(0.4)) == 0.5
    target = Objective(lam=2.0, target=0.5)
    assert target.penalty(torch.tensor(0.2)).item() == pytest.approx(0.6)
    assert target.price(torch.tensor(0.7)).item() == 2.0 and target.price(torch.tensor(0.3)).item() == -2.0
    squared = Objective(lam=2.0, target=0.5, target_loss="squared")
    assert squared.penalty(torch.tensor(0.2)).item() == pytest.approx(0.18)
    assert squared.price(torch.tensor(0.7)).item() == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"gate": "sigmod"}, f"unknown gate 'sigmod'; choose one of: {', '.join(dp.list_gates())} \\(or null\\)"),
     ({"lam": -1.0}, "lam must be >= 0, got -1.0"),
     ({"target": 1.5}, r"target .* must be in \(0, 1\], got 1.5"),
     ({"cost": "macs"}, "unknown cost 'macs'"),
     ({"target_loss": "huber"}, "unknown target_loss 'huber'; choose one of: abs, squared"),
     ({"budget": 1.0}, "budget > 0 bounds each layer around the FLOPs target"),
     ({"distill": 1.0}, "distill > 0 needs a teacher: set teacher to a checkpoint path or an nn.Module, or "
                        "dense_epochs"),
     ({"granularity": "stage"}, "unknown granularity 'stage'"),
     ({"backbone": "resnet21"}, "unknown backbone 'resnet21'")],
)
def test_bad_arguments_have_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dp.GatedClassifier(**{"backbone": "lenet5", **kwargs})


@pytest.mark.parametrize(
    ("name", "value"),
    [("lam", float("nan")), ("lam", float("inf")), ("lam", -1.0), ("lr", -0.1), ("lr", float("nan")), ("lr", 0.0),
     ("gate_lr", -1.0), ("momentum", -1.0), ("momentum", 1.0), ("weight_decay", -1e-4), ("weight_decay", float("inf")),
     ("distill", float("nan")), ("distill_temperature", 0.0), ("bn_recalibration", -5), ("bn_recalibration", 2.5),
     ("hard_finetune", float("nan")), ("dense_epochs", -1), ("target", float("nan")), ("budget_width", -0.1),
     ("budget_anneal", 0.0), ("batch_shaping", float("inf")), ("logit_penalty", -1.0), ("logit_penalty_warmup", 1.5),
     ("width_targets", float("nan")), ("width_mult", 0.0), ("depth_mult", float("nan"))],
)
def test_bad_numbers_are_errors_naming_the_argument_and_its_value(name: str, value: float) -> None:
    """Through the Python API too (the CLI's types do not check ranges): nan, inf and out-of-range values raise
    before training, with the argument, its value and the allowed range."""
    kwargs = {"distill": 1.0, "dense_epochs": 1} if name == "distill_temperature" else {}
    with pytest.raises(ValueError, match=rf"^{name}\b.* must be .*, got {value!r}$"):
        dp.GatedClassifier("lenet5", **{**kwargs, name: value})


@pytest.mark.numerics
def test_dense_baseline_and_warm_start(tmp_path) -> None:
    dense = dp.GatedClassifier("resnet20", gate=None, input_size=8)
    assert not dense.gated and dense.profile.dense_total > 0
    path = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict()}, path)
    gated = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, init_from=str(path),
                               gate_kwargs={"init_bias": 20.0})
    x = torch.randn(2, 1, 8, 8)
    dense.eval(), gated.eval()
    assert_close_rounding(gated(x), dense(x), depth=weight_depth(dense))
    with pytest.raises(ValueError, match="does not match the backbone"):
        dp.GatedClassifier("vgg11", gate="sigmoid", input_size=8, init_from=str(path))


@pytest.mark.numerics
def test_bn_recalibration_uses_thresholded_masks() -> None:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    dm.setup()
    module = dp.GatedClassifier("resnet20", gate="l1", input_size=8, width_mult=0.5, gate_kwargs={"init_bias": 0.0})
    batches = [batch for _, batch in zip(range(3), dm.train_dataloader(), strict=False)]

    def bn2_input_means(soft: bool) -> torch.Tensor:
        model = copy.deepcopy(module.model).train()
        for gate in dp.gates_of(model).values():
            gate.set_mode("train" if soft else "hard")
        seen = []
        model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        return torch.stack(seen).mean(dim=0)

    recalibrate_norms(module.model, batches, 3)
    stats = module.model.layer1[0].bn2.running_mean
    hard = bn2_input_means(soft=False)
    assert_close_rounding(stats, hard, depth=4)  # conv1, layer1.0.conv1, conv2 and the average over batches
    assert (stats - bn2_input_means(soft=True)).abs().max() > 0.01 * hard.abs().max()
    assert module.model.layer1[0].bn2.momentum == 0.1 and module.model.training


class SoftSigmoid(SigmoidGate):
    """An out-of-tree family that trains with soft masks and asks for the phases such a family needs."""

    phases = ("bn_recalibration", "hard_finetune")

    def train_decisions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()


@pytest.fixture
def soft_family():
    register_gate("soft_sigmoid")(SoftSigmoid)
    yield "soft_sigmoid"
    GATES.unregister("soft_sigmoid")


@pytest.mark.parametrize("family", ["l1", "soft_family", "sigmoid"])
@pytest.mark.parametrize("validate", [False, True])
def test_soft_gates_are_recalibrated_once_per_epoch_even_without_validation(
        validate: bool, family: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Without a validation loop (as in experiments/iso_flops.py) a soft family used to be tested with the BN
    statistics of soft masks, and collapsed to chance; with one, validation's recalibration is not repeated.
    The phase comes from the family's declaration, for an out-of-tree family as for a built-in one (none for a
    family that trains with hard decisions)."""
    family = request.getfixturevalue(family) if family.endswith("_family") else family
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate=family, input_size=8, width_mult=0.5, target=0.5)
    calls: list[int] = []
    original = phases.recalibrate_norms
    monkeypatch.setattr(phases, "recalibrate_norms", lambda *args: (calls.append(module.global_step), original(*args)))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2 if validate else 0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    assert calls == ([] if family == "sigmoid" else [3, 6])  # once after each epoch's last step, if declared


def test_a_backbone_handed_over_in_eval_mode_trains_its_batchnorm() -> None:
    """Lightning keeps submodule modes: the module must put its model in train mode at fit start."""
    for backbone in (dp.backbones.create("resnet20", input_size=8, width_mult=0.5).eval(), _static_pruned()):
        before = backbone.bn1.running_mean.clone()
        module = dp.GatedClassifier(backbone, gate=None, input_size=8, lr=0.01)
        L.Trainer(max_steps=3, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dp.DigitsDataModule())
        assert not torch.equal(before, module.model.bn1.running_mean)
    frozen = dp.GatedClassifier("resnet20", gate=None, input_size=8, frozen=["bn1"])
    before = frozen.model.bn1.running_mean.clone()
    L.Trainer(max_steps=3, limit_val_batches=0, **quiet_trainer_kwargs()).fit(frozen, dp.DigitsDataModule())
    assert torch.equal(before, frozen.model.bn1.running_mean)  # frozen on purpose, and only then
    assert not frozen.model.bn1.weight.requires_grad and frozen.model.conv1.weight.requires_grad


def _static_pruned() -> nn.Module:
    """A structurally pruned ResNet-20 left in eval mode by ``dynprune.static.accuracy``."""
    model = dp.backbones.create("resnet20", input_size=8, width_mult=0.5)
    pruned = dp.static.remove_channels(dp.static.prune_model(model, "l1_structured", 0.5))
    dp.static.accuracy(pruned, dp.DigitsDataModule(), "val")
    assert not pruned.training
    return pruned


@pytest.mark.numerics
def test_distillation_is_zero_for_the_teacher_itself_and_positive_otherwise(tmp_path) -> None:
    dense = dp.GatedClassifier("resnet20", gate=None, input_size=8, width_mult=0.5)
    path = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict(), "hyper_parameters": dict(dense.hparams)}, path)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, init_from=str(path),
                                teacher=str(path), distill=1.0, gate_kwargs={"init_bias": 20.0})
    x = torch.randn(4, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        student, teacher = module(x), module.distiller.teacher(x)
    assert_close_rounding(student, teacher, depth=weight_depth(module.distiller.teacher))
    for gate in dp.gates_of(module.model).values():
        gate.force(torch.zeros(gate.fc2.out_features))
    with torch.no_grad():
        off = distillation_loss(module(x), teacher).item()
    assert off > 1e-3 and distillation_loss(student, teacher).item() < 1e-6 * off
    assert not any("teacher" in k for k in module.state_dict())


def test_eval_report_counts_width_units_only_when_the_narrower_units_are_on() -> None:
    """Width units are nested: a unit 'wider than 0.5' that is on while 'wider than 0.25' is off changes nothing,
    so the dependence statistics (masks, keep) must see it as off."""
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity="width", input_size=8, width_mult=0.5)
    module.eval()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    pattern = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for gate in dp.gates_of(module.model).values():
        gate.force(pattern)
    with torch.no_grad():
        out = module._eval_step((x, y), "test", module.test_acc)
    effective = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    for name in dp.gates_of(module.model):
        torch.testing.assert_close(out["masks"][name].float(), effective)
        torch.testing.assert_close(out["keep"][name], effective.mean(dim=1))


@pytest.mark.parametrize("family", ["l1", "soft_family", "sigmoid"])
def test_soft_families_train_with_their_inference_masks_in_the_hard_finetune_phase(
        family: str, request: pytest.FixtureRequest) -> None:
    """Soft families (l1, an out-of-tree one) train soft, then for the last ``hard_finetune`` of the steps the network
    trains with the thresholded masks it will run with at inference; a hard family is hard throughout."""
    family = request.getfixturevalue(family) if family.endswith("_family") else family
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate=family, input_size=8, width_mult=0.5, target=0.5,
                                hard_finetune=0.5, gate_kwargs={"init_bias": 0.0})
    binary: list[bool] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            masks = torch.cat([m.flatten() for m in pl_module.masks().values()])
            binary.append(bool(((masks == 0) | (masks == 1)).all()))

    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Spy()])
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    assert binary == ([True] * 4 if family == "sigmoid" else [False, False, True, True])
    gate = next(iter(dp.gates_of(module.model).values())).set_mode("finetune")
    x = torch.randn(5, gate.fc1.in_features, 4, 4)
    decisions = gate(x)
    torch.testing.assert_close(decisions, gate.hard_decisions(gate.logits(x)))
    decisions.sum().backward()  # straight through: the gates still learn while the network sees hard masks
    assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hard_finetune"):
        dp.GatedClassifier("resnet20", gate="l1", input_size=8, hard_finetune=1.0)


def test_dense_epochs_train_dense_then_gate_with_the_snapshot_as_teacher_and_a_fresh_schedule() -> None:
    """The warm start inside one run: gates off (no masks, no cost) for ``dense_epochs``, then on; the teacher is
    the model as it was when the gates started; the lr restarts its cosine; the gated schedules start at 0."""
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, target=0.5, distill=1.0,
                                dense_epochs=1)
    seen: list[tuple[int, bool, float, float]] = []
    snapshot: dict[str, torch.Tensor] = {}

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                snapshot.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            seen.append((trainer.current_epoch, bool(pl_module.masks()), pl_module.progress(),
                         trainer.optimizers[0].param_groups[0]["lr"]))

    trainer = L.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=0, callbacks=[Spy()],
                        **quiet_trainer_kwargs())
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    assert [gated for epoch, gated, _, _ in seen] == [False] * 4 + [True] * 8
    assert [p for epoch, _, p, _ in seen if epoch == 0] == [0.0] * 4
    assert [p for epoch, _, p, _ in seen if epoch > 0] == pytest.approx([(i + 1) / 8 for i in range(8)])
    lrs: dict[int, float] = {}
    for epoch, _, _, lr in seen:
        lrs.setdefault(epoch, lr)  # at an epoch's first step (the last one may see the next epoch's lr)
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.1) and lrs[2] == pytest.approx(0.05)
    teacher = module.distiller.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in snapshot.items())
    assert not all(torch.equal(teacher[k], v) for k, v in module.model.state_dict().items())
    assert module.model.dynprune.switch.enabled  # gates on after fit


def test_dense_epochs_arguments_and_best_checkpoint(tmp_path: Path) -> None:
    """best.ckpt is never a dense warm-up epoch (its accuracy is not the gated model's); a resumed run gets the
    teacher of the original run back; dense_epochs must leave a gated epoch."""
    with pytest.raises(ValueError, match="dense_epochs"):
        dp.GatedClassifier("lenet5", gate=None, dense_epochs=1)
    with pytest.raises(ValueError, match="no gated epoch"):
        L.Trainer(max_epochs=1, **quiet_trainer_kwargs()).fit(
            dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, dense_epochs=1), dp.DigitsDataModule())
    L.seed_everything(0)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, target=0.25,
                                distill=1.0, dense_epochs=1)
    best = dp.callbacks.GatedCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best",
                                        save_last=True)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=[best],
                        **quiet_trainer_kwargs(enable_checkpointing=True))
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == 1
    resumed = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, target=0.25,
                                 distill=1.0, dense_epochs=1)
    assert resumed.distiller.teacher is None
    resumed.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=False))
    for k, v in module.distiller.teacher.state_dict().items():
        assert torch.equal(resumed.distiller.teacher.state_dict()[k], v)


def _per_input_flops(module: dp.GatedClassifier, dm: L.LightningDataModule) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        ratios = []
        for x, _ in dm.val_dataloader():
            module(x)
            ratios.append(module.profile.total(module.profile.per_layer(module.masks())) / module.profile.dense_total)
    return torch.cat(ratios)


def test_logit_penalty_makes_per_input_flops_vary_at_the_same_mean() -> None:
    """Scores held near the boundary early in the gated phase: the spread p90/p10 of per-input FLOPs grows
    clearly over the same seeded run without it (measured 1.08 -> 1.40), the mean stays at the target."""
    spread, mean = {}, {}
    for weight in (0.0, 0.1):
        L.seed_everything(0)
        dm = dp.DigitsDataModule(batch_size=64)
        dm.setup()
        module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, target=0.5, lr=0.05,
                                    dense_epochs=2, distill=1.0, logit_penalty=weight, logit_penalty_warmup=0.8)
        L.Trainer(max_epochs=6, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
        flops = _per_input_flops(module, dm)
        p10, p90 = flops.quantile(torch.tensor([0.1, 0.9]))
        spread[weight], mean[weight] = (p90 / p10).item(), flops.mean().item()
    assert spread[0.1] > spread[0.0] + 0.15, spread
    assert all(m == pytest.approx(0.5, rel=0.1) for m in mean.values()), mean
