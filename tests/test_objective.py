"""The gated objective on real (digits) training: targets reached with default arguments by every
family, the per-layer budget, and batch shaping making gates input-dependent."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer_kwargs

import dynprune as dp


def _fit(steps: int = 150, **kwargs: object) -> tuple[dp.GatedClassifier, dp.DigitsDataModule]:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    dm.setup()
    module = dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, lr=0.05, **kwargs)
    L.Trainer(max_steps=steps, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    return module.eval(), dm


def _eval_masks(module: dp.GatedClassifier, dm: dp.DigitsDataModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-input FLOPs ratio (N,) and {site: decisions (N, U)} over the validation set."""
    ratios, masks = [], {}
    with torch.no_grad():
        for x, _ in dm.val_dataloader():
            module(x)
            ratios.append(module.profile.ratio(module.masks()))
            for n, m in module.masks().items():
                masks.setdefault(n, []).append(m)
    return torch.cat(ratios), {n: torch.cat(v) for n, v in masks.items()}


@pytest.mark.parametrize("gate", dp.list_gates())
def test_target_mode_with_default_arguments_reaches_the_target(gate: str) -> None:
    module, dm = _fit(gate=gate, target=0.5)
    ratio, _ = _eval_masks(module, dm)
    assert ratio.mean().item() == pytest.approx(0.5, abs=0.05)


def test_per_layer_budget_keeps_every_layer_within_its_bounds() -> None:
    module, dm = _fit(gate="sigmoid", target=0.5, budget=20.0, budget_width=0.2, budget_anneal=0.1)
    _, masks = _eval_masks(module, dm)
    per_site = module.objective.site_ratios(masks, module.profile)
    free, _ = _fit(gate="sigmoid", target=0.5)
    _, free_masks = _eval_masks(free, dm)
    free_sites = free.objective.site_ratios(free_masks, free.profile)

    def outside(ratios: torch.Tensor) -> torch.Tensor:  # distance of each layer's FLOPs ratio from [0.3, 0.7]
        return (0.3 - ratios).clamp(min=0) + (ratios - 0.7).clamp(min=0)

    assert outside(per_site).max() < 0.06, per_site
    assert outside(per_site).sum() < 0.5 * outside(free_sites).sum(), (per_site, free_sites)


def test_batch_shaping_makes_the_gates_vary_across_inputs() -> None:
    def variance(weight: float) -> float:
        module, dm = _fit(gate="sigmoid", target=0.5, batch_shaping=weight)
        _, masks = _eval_masks(module, dm)
        return torch.cat([m.float().var(dim=0) for m in masks.values()]).mean().item()

    assert variance(2.0) > 2 * variance(0.0) + 0.01


def test_policy_reaches_a_low_target_within_002() -> None:
    """REINFORCE at 1/4 of the FLOPs: before the gradient of clamped scores could pass inward, a third of the
    units froze open beyond the clamp and the policy stalled at 0.29 of the FLOPs."""
    module, dm = _fit(steps=400, gate="policy", target=0.25)
    ratio, _ = _eval_masks(module, dm)
    assert ratio.mean().item() == pytest.approx(0.25, abs=0.02)
