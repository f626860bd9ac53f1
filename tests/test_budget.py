"""Reaching a FLOPs target by construction: dual ascent on the target's multiplier and a controller that moves the
gate scores towards the shift that puts each batch on the target while training, and one shift of every gate's score
chosen on validation data after training (dynprune.budget)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer_kwargs

import dynprune as dp
from dynprune.budget import batch_shift, control_step, mean_flops_ratio, meet_budget
from dynprune.objective import Objective


def test_dual_ascent_raises_the_price_while_over_the_target_and_lowers_it_under_never_below_zero() -> None:
    obj = Objective(lam=1.0, target=0.5, target_dual=0.1)
    assert obj.penalty(torch.tensor(0.6)).item() == pytest.approx(0.1)  # mu = 0: lam * |c - t| only
    obj.dual_step(torch.tensor(0.6))  # 20% over: mu += 0.1 * 0.2
    assert obj.mu == pytest.approx(0.02)
    assert obj.penalty(torch.tensor(0.6)).item() == pytest.approx(0.1 + 0.02 * 0.1)
    assert obj.price(torch.tensor(0.6)).item() == pytest.approx(1.02)  # what a REINFORCE reward pays
    obj.dual_step(torch.tensor(5.0))  # the relative error is clipped to 1: one step moves mu by target_dual at most
    assert obj.mu == pytest.approx(0.12)
    obj.dual_step(torch.tensor(0.25))  # 50% under the target: the price falls
    assert obj.mu == pytest.approx(0.07)
    obj.dual_step(torch.tensor(0.0))  # projected: never below 0
    assert obj.mu == 0.0
    fixed = Objective(lam=1.0, target=0.5)
    fixed.dual_step(torch.tensor(0.9))
    assert fixed.mu == 0.0
    with pytest.raises(ValueError, match="target_dual > 0 .* set target too"):
        Objective(lam=1.0, target_dual=0.1)
    with pytest.raises(ValueError, match="target_dual must be >= 0"):
        Objective(lam=1.0, target=0.5, target_dual=-1.0)


def _gated_digits(**kwargs: object) -> tuple[dp.GatedClassifier, dp.DigitsDataModule]:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, lr=0.05, **kwargs)
    return module, dm


def test_meet_budget_lands_on_the_target_on_its_inputs_and_refuses_an_unreachable_one() -> None:
    module, dm = _gated_digits(gate_kwargs={"init_bias": 0.0})
    dm.setup()
    inputs = [x for x, _ in dm.val_dataloader()]
    before = mean_flops_ratio(module.model, module.profile, inputs)
    for target in (0.3, 0.6):
        result = meet_budget(module.model, module.profile, inputs, target, tolerance=0.01)
        assert result.after == pytest.approx(target, rel=0.01)
        assert mean_flops_ratio(module.model, module.profile, inputs) == pytest.approx(result.after, rel=1e-6)
    assert result.before != pytest.approx(before, rel=0.01)  # the second call started where the first ended
    kept = meet_budget(module.model, module.profile, inputs, 0.9, down_only=True)  # under its target: left alone
    assert kept.shift == 0.0 and kept.after == kept.before == pytest.approx(result.after, rel=1e-6)
    lowered = meet_budget(module.model, module.profile, inputs, 0.4, tolerance=0.01, down_only=True)
    assert lowered.shift < 0 and lowered.after == pytest.approx(0.4, rel=0.01)
    state = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(ValueError, match="no shift of the gate scores .* reaches the FLOPs target 0.00010"):
        meet_budget(module.model, module.profile, inputs, 1e-4)
    assert all(torch.equal(state[k], v) for k, v in module.model.state_dict().items())  # a refusal changes nothing
    with pytest.raises(ValueError, match="model is not gated"):
        meet_budget(dp.GatedClassifier("resnet20", gate=None, input_size=8).model, module.profile, inputs, 0.5)


def test_target_calibrate_brings_a_run_over_its_target_onto_it_on_validation_and_dual_state_survives_a_checkpoint(
        ) -> None:
    module, dm = _gated_digits(lam=0.1, target=0.25, target_dual=0.005, target_calibrate=True)
    with pytest.warns(UserWarning, match="a shift this large also switches off units"):
        L.Trainer(max_steps=20, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    assert module.objective.mu > 0.0  # 20 steps at a small lam stay over the target: the price rose
    shift = module.budget_shift
    assert shift is not None and shift.before > 0.25 * 1.1 and shift.shift < 0
    inputs = [x for x, _ in dm.val_dataloader()]
    assert mean_flops_ratio(module.model, module.profile, inputs) == pytest.approx(0.25, rel=0.005)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    other, _ = _gated_digits(lam=0.1, target=0.25, target_dual=0.005)
    other.on_load_checkpoint(checkpoint)
    assert other.objective.mu == module.objective.mu
    with pytest.raises(ValueError, match="target_calibrate .* needs a gate and a target"):
        dp.GatedClassifier("lenet5", target_calibrate=True)


@pytest.mark.parametrize("mode", [True, "both"])
def test_target_calibrate_leaves_a_run_under_its_target_unless_told_both(mode: bool | str) -> None:
    """Down only (True) keeps a model under its target as it is; "both" shifts it up onto the target."""
    module, dm = _gated_digits(lam=0.0, target=0.9, gate_kwargs={"init_bias": -1.0}, target_calibrate=mode)
    L.Trainer(max_steps=2, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    shift = module.budget_shift
    assert shift is not None and shift.before < 0.9 * 0.97
    inputs = [x for x, _ in dm.val_dataloader()]
    after = mean_flops_ratio(module.model, module.profile, inputs)
    if mode == "both":
        assert shift.shift > 0 and after == pytest.approx(0.9, rel=0.005)
    else:
        assert shift.shift == 0.0 and after == pytest.approx(shift.before, rel=1e-6)
    with pytest.raises(ValueError, match="target_calibrate is true, false or 'both', got 'up'"):
        _gated_digits(target=0.5, target_calibrate="up")


def test_batch_shift_puts_the_last_batch_on_the_target_and_stops_at_the_end_of_its_range() -> None:
    module, dm = _gated_digits(gate_kwargs={"init_bias": 0.0})
    dm.setup()
    x = next(iter(dm.val_dataloader()))[0]
    module.model.eval()
    gates = dp.gates_of(module.model)
    first = next(iter(gates))
    gates[first].scores = None  # as before any forward pass
    with pytest.raises(ValueError, match=f"scores of a forward pass; none yet at .*{first}"):
        batch_shift(gates, module.profile, 0.3)
    with torch.no_grad():
        module.model(x)
    before = mean_flops_ratio(module.model, module.profile, [x])
    for target in (0.3, 0.6):
        shift = batch_shift(gates, module.profile, target)
        control_step(module.model, shift)
        assert mean_flops_ratio(module.model, module.profile, [x]) == pytest.approx(target, rel=0.1)
        control_step(module.model, -shift)
    assert mean_flops_ratio(module.model, module.profile, [x]) == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        module.model(x)
    assert batch_shift(gates, module.profile, 1e-6) == -30.0  # unreachable: the end of the range
    with pytest.raises(ValueError, match="finite shift, got nan"):
        control_step(module.model, float("nan"))
    with pytest.raises(ValueError, match="target_control > 0 .* set target too"):
        Objective(lam=1.0, target_control=0.5)
    with pytest.raises(ValueError, match=r"target_control must be .*in \[0, 1\]"):
        Objective(lam=1.0, target=0.5, target_control=2.0)


def test_target_control_follows_a_far_target_while_training_where_the_penalty_alone_stays_over_it() -> None:
    runs = {}
    for control in (0.0, 0.5):
        module, dm = _gated_digits(lam=0.1, target=0.1, target_control=control)
        L.Trainer(max_steps=120, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
        dm.setup()
        module.model.train()  # the training-mode decisions the controller sees (BN on batch statistics)
        with torch.no_grad():
            ratios = [mean_flops_ratio(module.model, module.profile, [x]) for x, _ in dm.train_dataloader()]
        runs[control] = (sum(ratios) / len(ratios), module.objective.shift)
    (free, no_shift), (controlled, shift) = runs[0.0], runs[0.5]
    assert no_shift == 0.0 and free > 0.1 * 1.5  # the penalty alone is still far over 1/10 after 120 steps
    assert shift < 0 and controlled == pytest.approx(0.1, rel=0.15)  # the controller brought it there
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    other, _ = _gated_digits(lam=0.1, target=0.1, target_control=0.5)
    other.on_load_checkpoint(checkpoint)
    assert other.objective.shift == shift
    other.on_load_checkpoint({"target_mu": 0.5})  # a checkpoint from before the controller: the multiplier only
    assert other.objective.mu == 0.5
