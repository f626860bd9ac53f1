"""Gate families: the contract every registered family meets, and each family's own semantics."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_close_rounding

import dynprune as dp
from dynprune.gates import GateContext, GumbelGate, L1Gate, PolicyGate, Rollout, SigmoidGate
from dynprune.gates.policy import InwardOnly


def test_unknown_family_lists_every_registered_one() -> None:
    with pytest.raises(ValueError, match=f"unknown gate 'sigmod'; choose one of: {', '.join(dp.list_gates())}$"):
        dp.create_gate("sigmod", 4, 4)


@pytest.mark.parametrize("family", dp.list_gates())
def test_gate_contract(family: str) -> None:
    """Shapes, values in [0, 1], hard 0/1 at eval following G(x) >= 0, force(), modes, gradients reach G."""
    torch.manual_seed(0)
    gate = dp.create_gate(family, 6, 5, init_bias=0.0)
    x = torch.randn(8, 6, 3, 3)
    mask = gate.train()(x)
    assert mask.shape == (8, 5) and ((mask >= 0) & (mask <= 1)).all()
    assert gate.probs is not None and gate.mask is mask
    greedy = Rollout(torch.rand(8), {"g": torch.rand(8)}, torch.rand(8))
    ctx = GateContext(torch.rand(8), torch.rand(8), lambda: greedy, 0.5, "g", lambda c=None: torch.tensor(1.0))
    extra = gate.training_loss(ctx)
    loss = mask.sum() + (extra if extra is not None else 0)
    loss.backward()
    assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
    hard = gate.eval()(x)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gate.set_mode("hard").train()(x), hard)  # hard decisions while nn training mode is on
    gate.set_mode(None)
    forced = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.equal(gate.force(forced)(x), forced.expand(8, 5))
    with pytest.raises(ValueError, match="unknown gate mode 'soft'"):
        gate.set_mode("soft")
    for wrong in (torch.ones(4), torch.ones(8, 6), torch.tensor(1.0)):  # the gate has 5 units
        with pytest.raises(ValueError, match=rf"force: mask of shape {re.escape(str(tuple(wrong.shape)))} for a "
                                             r"gate of 5 units; expected \(5,\) or \(N, 5\)"):
            gate.force(wrong)


@pytest.mark.numerics
def test_sigmoid_is_hard_in_train_with_straight_through_grad() -> None:
    gate = SigmoidGate(6, 5, init_bias=0.0).train()
    x = torch.randn(4, 6, 3, 3)
    mask = gate(x)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    probs = gate.logits(x).sigmoid()
    assert torch.equal(mask.detach(), (probs >= 0.5).float())
    mask.sum().backward()
    # d mask / d logits = sigma' (straight-through), so fc2.bias.grad = sum_n sigma'(z).
    expected = (probs * (1 - probs)).sum(dim=0)
    assert_close_rounding(gate.fc2.bias.grad, expected.detach(), depth=2)  # positive terms: no cancellation


def test_l1_soft_in_train_threshold_in_eval() -> None:
    gate = L1Gate(6, 5, threshold=0.6, init_bias=0.0)
    assert gate.phases == ("bn_recalibration", "hard_finetune") and SigmoidGate.phases == ()
    x = torch.randn(8, 6)
    soft = gate.train()(x)
    assert ((soft > 0) & (soft < 1)).all()
    hard = gate.eval()(x)
    assert torch.equal(hard, (soft.detach() >= 0.6).float())
    with pytest.raises(ValueError, match="threshold"):
        L1Gate(6, 5, threshold=1.5)


def test_gumbel_samples_around_its_probability_and_is_deterministic_at_eval() -> None:
    torch.manual_seed(0)
    gate = GumbelGate(4, 1, init_bias=0.0)
    assert gate.temperature == pytest.approx(2 / 3)
    assert GumbelGate(4, 3).fc2.bias.detach().mean().item() == pytest.approx(2.0)
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.fill_(1.0)  # p = sigma(1) = 0.731 for every input
    x = torch.randn(4000, 4)
    sample = gate.train()(x)
    assert set(sample.detach().unique().tolist()) == {0.0, 1.0}
    p = torch.sigmoid(torch.tensor(1.0)).item()
    assert sample.mean().item() == pytest.approx(p, abs=5 * (p * (1 - p) / sample.numel()) ** 0.5)  # 5 sigma
    assert gate.eval()(x).mean().item() == 1.0


@pytest.mark.numerics
def test_policy_reinforce_sign_credit_and_self_critical_baseline() -> None:
    """The surrogate's gradient raises the log-prob of decisions that beat the greedy policy."""
    torch.manual_seed(0)
    gate = PolicyGate(6, 200, init_bias=0.0, entropy=0.0).train()
    x = torch.randn(16, 6)
    mask = gate(x)
    assert not mask.requires_grad and 0.3 < mask.mean() < 0.7  # p ~ 0.5: genuinely sampled
    probs = gate.logits(x).sigmoid().detach()
    # cost = fraction kept; greedy policy costs 0.5 with equal task loss: a sample keeping less is better.
    site_cost = mask.mean(dim=1)
    greedy = Rollout(torch.zeros(16), {"g": torch.full((16,), 0.5)}, torch.full((16,), 0.5))
    ctx = GateContext(torch.zeros(16), site_cost, lambda: greedy, 0.0, "g", lambda c=None: torch.tensor(1.0))
    gate.training_loss(ctx).backward()
    # advantage_i = -(cost_i - 0.5) / rms; d surrogate / d bias_c = -mean_i adv_i * (m_ic - p_ic)
    adv = -(site_cost - 0.5)
    adv = adv / adv.square().mean().sqrt()
    terms = adv[:, None] * (mask - probs)
    assert_close_rounding(gate.fc2.bias.grad, -terms.mean(dim=0), depth=2, scale=terms.abs().mean(dim=0).max().item())
    assert gate.fc2.bias.grad.mean() > 0  # descent lowers the open probability: more cost is worse
    assert torch.equal(gate.eval()(x), (probs >= 0.5).float())
    with pytest.raises(ValueError, match="clamp"):
        PolicyGate(6, 2, clamp=0.6)


def test_policy_scores_beyond_the_clamp_keep_only_their_inward_gradient() -> None:
    """A clamped policy's score past the clamp must not freeze: its gradient passes when descent would bring
    it back towards the boundary, and is dropped when it would push it further out."""
    scores = torch.tensor([5.0, 5.0, -5.0, -5.0, 1.0, 1.0], requires_grad=True)
    grad = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])  # descent moves each score by -grad
    InwardOnly.apply(scores, 3.0).backward(grad)
    assert scores.grad.tolist() == [1.0, 0.0, -1.0, 0.0, 1.0, -1.0]
    torch.manual_seed(0)
    gate = PolicyGate(6, 3, init_bias=6.0, clamp=0.02).train()  # p = 0.9975, beyond the clamp
    gate(torch.randn(1024, 6))
    ctx = GateContext(torch.zeros(1024), gate.mask.mean(dim=1),
                      lambda: Rollout(torch.zeros(1024), {"g": torch.ones(1024)}, torch.ones(1024)), 0.0, "g",
                      lambda c=None: torch.tensor(1.0))
    gate.training_loss(ctx).backward()  # samples that keep less than greedy are better: close the gate
    assert gate.fc2.bias.grad.gt(0).all()  # descent lowers the scores: the gate is not frozen open


def test_init_bias_starts_gates_open() -> None:
    gate = SigmoidGate(8, 16, init_bias=3.0).eval()
    assert gate(torch.randn(32, 8, 4, 4)).mean() > 0.95
