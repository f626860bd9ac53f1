"""Shared test setup: wandb disabled, quiet Lightning, seeded."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
ULPS_PER_LAYER = 16  # rounding slack per accumulating layer, in units of eps times the largest value


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--torch-threads", type=int, default=1,
                     help="torch intra-op threads for the whole run (default 1: small models, shared machines); "
                          "`make test` reruns the tests marked `numerics` with 2")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--torch-threads")
    if threads < 1:
        raise pytest.UsageError(f"--torch-threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def weight_depth(model: nn.Module) -> int:
    """Number of conv and linear layers of ``model``: a bound on the accumulating layers an output passes."""
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules())


def assert_close_rounding(actual: Tensor, expected: Tensor, depth: int = 1, scale: float | None = None) -> None:
    """``actual`` equals ``expected`` up to float rounding: elementwise within ``ULPS_PER_LAYER * depth * eps``
    times ``scale`` (default: the largest ``|expected|``).

    Two computations of the same values that differ only in summation order (thread count, CPU kernels,
    folded or removed terms) round apart by a few eps of the largest value per accumulating layer, so this bound
    holds on any machine and thread count while any real difference (a wrong channel, a missing term) exceeds
    it by orders of magnitude. Pass ``scale`` where a result is a sum that may cancel (the sum of the
    absolute terms), ``depth`` for a network (:func:`weight_depth`).
    """
    eps = torch.finfo(expected.dtype).eps
    scale = float(expected.detach().abs().max()) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=ULPS_PER_LAYER * depth * eps * scale)


def quiet_trainer_kwargs(**overrides: object) -> dict:
    """Trainer kwargs for fast, silent test runs."""
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    kwargs.update(overrides)
    return kwargs


def digits_masks_after_fit(granularity: str, lam: float, steps: int = 60) -> list[dict[str, torch.Tensor]]:
    """Seeded: a sigmoid-gated ResNet-20 (8x8 digits, half width) trained ``steps`` steps at ``lam``; the
    decisions of each validation batch, in eval mode."""
    import lightning as L

    import dynprune as dp

    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=64)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", granularity=granularity, lam=lam, input_size=8,
                                width_mult=0.5, lr=0.05, gate_kwargs={"init_bias": 1.0})
    L.Trainer(max_steps=steps, limit_val_batches=0, **quiet_trainer_kwargs()).fit(module, dm)
    dm.setup()
    module.eval()
    masks = []
    with torch.no_grad():
        for x, _ in dm.val_dataloader():
            module(x)
            masks.append(module.masks())
    return masks


class Acceptance:
    """Which (model, gate family, granularity) ``gate_model`` accepts, from its dry run (``plan_sites``), so that
    tests parametrize only what it accepts and check the rest is refused. Each model is built once and traced
    once per granularity; the family matters only through ``Granularity.refuses_gate`` (checked before tracing).
    A ``+``-joined granularity is accepted when each part is accepted on the ungated model."""

    def __init__(self, models: Mapping[str, Callable[[], nn.Module]], **plan_kwargs: Any) -> None:
        self.models, self.plan_kwargs = models, plan_kwargs
        self._built: dict[str, nn.Module] = {}
        self._sites: dict[tuple[str, str], str | None] = {}

    def refusal(self, name: str, gate: str, granularity: str) -> str | None:
        """Why ``gate_model`` refuses the combination (None: it accepts it)."""
        from dynprune.granularity import create_granularity
        from dynprune.inject import plan_sites

        for part in granularity.split("+"):
            if reason := create_granularity(part).refuses_gate(gate):
                return reason
            if (name, part) not in self._sites:
                if name not in self._built:
                    self._built[name] = self.models[name]()
                try:
                    plan_sites(self._built[name], granularity=part, **self.plan_kwargs)
                    self._sites[name, part] = None
                except ValueError as err:
                    self._sites[name, part] = str(err)
            if reason := self._sites[name, part]:
                return reason
        return None

    def split(self, cases: Iterable[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]],
                                                                     list[tuple[str, str, str]]]:
        """(accepted, refused) ``(model, gate, granularity)`` cases; a refusal that does not depend on the family
        (no sites) is listed once, with the first family that meets it."""
        accepted, refused, seen = [], [], set()
        for name, gate, granularity in cases:
            reason = self.refusal(name, gate, granularity)
            if reason is None:
                accepted.append((name, gate, granularity))
            elif (name, granularity, reason) not in seen:
                seen.add((name, granularity, reason))
                refused.append((name, gate, granularity))
        return accepted, refused
