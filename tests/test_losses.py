import numpy as np
import pytest
import torch
from conftest import assert_close_rounding
from scipy import stats

from dynprune.losses import (
    batch_shaping_loss,
    beta_cdf,
    beta_pdf,
    budget_bounds,
    budget_loss,
    distillation_loss,
    logit_penalty,
    target_penalty,
)


def test_batch_shaping_matches_a_scipy_reference():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(16, 5, generator=gen, dtype=torch.float64)
    ordered = np.sort(probs.numpy(), axis=0)
    ecdf = np.arange(1, 17)[:, None] / 17
    expected = np.mean((ecdf - stats.beta(0.6, 0.4).cdf(ordered)) ** 2)
    assert batch_shaping_loss(probs).item() == pytest.approx(expected, rel=1e-10)
    other = np.mean((ecdf - stats.beta(2.0, 3.0).cdf(ordered)) ** 2)
    assert batch_shaping_loss(probs, alpha=2.0, beta=3.0).item() == pytest.approx(other, rel=1e-10)


def test_beta_cdf_values_and_gradcheck():
    x = torch.linspace(0.05, 0.95, 11, dtype=torch.float64, requires_grad=True)
    assert beta_cdf(x, 0.6, 0.4).detach().numpy() == pytest.approx(stats.beta(0.6, 0.4).cdf(x.detach().numpy()))
    assert beta_pdf(x.detach(), 0.6, 0.4).numpy() == pytest.approx(stats.beta(0.6, 0.4).pdf(x.detach().numpy()))
    assert torch.autograd.gradcheck(lambda v: beta_cdf(v, 0.6, 0.4), (x,))
    assert torch.autograd.gradcheck(lambda v: beta_cdf(v, 2.0, 3.0), (x,))
    saturated = torch.tensor([0.0, 1.0], requires_grad=True)
    beta_cdf(saturated, 0.6, 0.4).sum().backward()
    assert torch.isfinite(saturated.grad).all()


def _train_logits(shaping: float) -> torch.Tensor:
    """Gate probabilities (64, 8) after 150 Adam steps on free logits: keep rate 0.5 (+ batch shaping)."""
    torch.manual_seed(0)
    logits = (0.1 * torch.randn(64, 8)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(150):
        probs = torch.sigmoid(logits)
        loss = (probs.mean(0) - 0.5).square().mean() + shaping * batch_shaping_loss(probs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(logits).detach()


def test_batch_shaping_makes_gates_bimodal():
    plain, shaped = _train_logits(0.0), _train_logits(1.0)
    prior = stats.beta(0.6, 0.4)
    tails = prior.cdf(0.1) + prior.sf(0.9)  # 0.435 of Beta(0.6, 0.4) lies below 0.1 or above 0.9
    assert plain.var(dim=0).mean() < 0.01
    assert shaped.var(dim=0).mean().item() == pytest.approx(prior.var(), abs=0.02)  # 0.12
    assert ((shaped < 0.1) | (shaped > 0.9)).float().mean().item() == pytest.approx(tails, abs=0.05)
    assert ((plain < 0.1) | (plain > 0.9)).float().mean() == 0.0
    ks = [stats.kstest(col.numpy(), prior.cdf).statistic for col in shaped.T]
    assert max(ks) < 0.2


def test_batch_shaping_rejects_a_vector():
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        batch_shaping_loss(torch.rand(8))


@pytest.mark.numerics
def test_distillation_zero_at_equality_and_matches_kl():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 10, generator=gen)
    assert distillation_loss(teacher.clone(), teacher).item() == 0.0  # the same bits on both sides
    student = torch.randn(6, 10, generator=gen, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    p_t = torch.softmax(teacher / 2, 1)
    terms = p_t * (p_t.log() - torch.log_softmax(student.detach() / 2, 1))  # may cancel: scale by |terms|
    assert loss.item() > 0.01
    assert_close_rounding(loss.detach(), terms.sum(1).mean() * 4, depth=2, scale=terms.abs().sum(1).mean().item() * 4)
    loss.backward()  # d/ds of T^2 KL = T (p_s - p_t) / N
    p_s = torch.softmax(student.detach() / 2, 1)
    assert_close_rounding(student.grad, 2 * (p_s - p_t) / 6, depth=2, scale=(2 * (p_s + p_t) / 6).max().item())
    with pytest.raises(ValueError, match="temperature must be positive; got 0"):
        distillation_loss(student, teacher, temperature=0)


def test_budget_bounds_schedule():
    assert budget_bounds(0.0, 0.25) == (0.0, 1.0)
    assert budget_bounds(1 / 3, 0.25) == pytest.approx((0.15, 0.35))
    assert budget_bounds(0.9, 0.25) == pytest.approx((0.15, 0.35))
    assert budget_bounds(1 / 6, 0.25) == pytest.approx((0.075, 0.675))
    assert budget_bounds(0.5, 0.05, anneal=0.5, width=0.1) == pytest.approx((0.0, 0.15))
    assert budget_bounds(0.0, 0.95, anneal=0.0) == pytest.approx((0.85, 1.0))
    with pytest.raises(ValueError, match="target keep rate must be in"):
        budget_bounds(0.5, 1.5)


def test_budget_loss_values_and_gradient_push_into_bounds():
    assert budget_loss(torch.tensor([0.4, 0.5, 0.6]), 0.4, 0.6).item() == 0.0
    keep = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    loss = budget_loss(keep, 0.4, 0.6)
    assert loss.item() == pytest.approx((0.2**2 + 0.3**2) / 3)
    loss.backward()
    assert keep.grad.tolist() == pytest.approx([-2 * 0.2 / 3, 0.0, 2 * 0.3 / 3])
    logits = torch.tensor([-3.0, 0.0, 3.0], requires_grad=True)
    opt = torch.optim.SGD([logits], lr=50.0)
    for _ in range(100):
        opt.zero_grad()
        budget_loss(torch.sigmoid(logits), 0.4, 0.6).backward()
        opt.step()
    rates = torch.sigmoid(logits).detach()
    assert ((rates > 0.38) & (rates < 0.62)).all()
    with pytest.raises(ValueError, match="lb=0.6 > ub=0.4"):
        budget_loss(keep, 0.6, 0.4)


def test_target_penalty_kinds():
    ratio = torch.tensor([0.1, 0.25, 0.55])
    assert target_penalty(ratio, 0.25).tolist() == pytest.approx([0.15, 0.0, 0.3])
    assert target_penalty(ratio, 0.25, kind="squared").tolist() == pytest.approx([0.0225, 0.0, 0.09])
    with pytest.raises(ValueError, match="unknown target penalty 'l2'; choose one of: abs, squared"):
        target_penalty(ratio, 0.25, kind="l2")



def test_logit_penalty_pulls_scores_towards_the_decision_boundary():
    scores = torch.tensor([[3.0, -1.0], [0.0, 2.0]], requires_grad=True)
    value = logit_penalty(scores)
    assert value.item() == pytest.approx((9 + 1 + 0 + 4) / 4)
    value.backward()
    assert torch.equal(scores.grad.sign(), torch.tensor([[1.0, -1.0], [0.0, 1.0]]))  # descent moves towards 0
