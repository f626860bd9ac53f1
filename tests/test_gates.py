"""Gate families: forward semantics in train/eval, straight-through gradient, registry."""

from __future__ import annotations

import pytest
import torch

import dynprune as dp
from dynprune.gates import L1Gate, PolicyGate, SigmoidGate


def test_registry_lists_all_families() -> None:
    assert dp.list_gates() == ["l1", "policy", "sigmoid"]
    with pytest.raises(ValueError, match="unknown gate 'sigmod'; choose one of: l1, policy, sigmoid"):
        dp.create_gate("sigmod", 4, 4)


def test_sigmoid_is_hard_in_train_with_straight_through_grad() -> None:
    gate = SigmoidGate(6, 5, init_bias=0.0).train()
    x = torch.randn(4, 6, 3, 3)
    mask = gate(x)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    probs = gate.logits(x).sigmoid()
    assert torch.equal(mask.detach(), (probs > 0.5).float())
    mask.sum().backward()
    # d mask / d logits = sigma' (straight-through), so fc2.bias.grad = sum_n sigma'(z).
    expected = (probs * (1 - probs)).sum(dim=0)
    assert torch.allclose(gate.fc2.bias.grad, expected.detach(), atol=1e-6)


def test_l1_soft_in_train_threshold_in_eval() -> None:
    gate = L1Gate(6, 5, threshold=0.6, init_bias=0.0)
    x = torch.randn(8, 6)
    soft = gate.train()(x)
    assert ((soft > 0) & (soft < 1)).all()
    hard = gate.eval()(x)
    assert torch.equal(hard, (soft.detach() >= 0.6).float())
    with pytest.raises(ValueError, match="threshold"):
        L1Gate(6, 5, threshold=1.5)


def test_policy_samples_with_log_prob_and_is_deterministic_at_eval() -> None:
    gate = PolicyGate(6, 200, init_bias=0.0).train()
    x = torch.randn(16, 6)
    mask = gate(x)
    assert not mask.requires_grad
    probs = gate.logits(x).sigmoid().detach()
    expected = (mask * probs.log() + (1 - mask) * (1 - probs).log()).sum(dim=1)
    assert torch.allclose(gate.log_prob, expected, atol=1e-4)
    assert 0.3 < mask.mean() < 0.7  # p ~ 0.5: genuinely sampled
    assert torch.equal(gate.eval()(x), (probs > 0.5).float())


def test_init_bias_starts_gates_open() -> None:
    gate = SigmoidGate(8, 16, init_bias=3.0).eval()
    assert gate(torch.randn(32, 8, 4, 4)).mean() > 0.95
