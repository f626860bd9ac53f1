"""FlopsCallback: statistics over a real validation epoch, files written, report text."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import quiet_trainer_kwargs

import dynprune as dp
from dynprune.callbacks import flops_stats, format_report
from dynprune.dependence import input_dependence


def test_flops_stats_numbers() -> None:
    stats = flops_stats(torch.tensor([10.0, 20.0, 30.0, 40.0]), dense=40)
    assert stats["flops_mean"] == 25.0 and stats["flops_min"] == 10.0 and stats["flops_max"] == 40.0
    assert stats["flops_p50"] == pytest.approx(25.0) and stats["flops_p90"] == pytest.approx(37.0)
    assert stats["flops_mean_ratio"] == 0.625 and stats["flops_saved"] == 0.375
    assert stats["flops_p10"] == pytest.approx(13.0) and stats["flops_p90_p10"] == pytest.approx(37.0 / 13.0)


def test_callback_matches_masks_and_writes_outputs(tmp_path) -> None:
    L.seed_everything(0)
    dm = dp.DigitsDataModule(batch_size=50)
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5,
                                gate_kwargs={"init_bias": 0.0})
    cb = dp.FlopsCallback(dirpath=str(tmp_path), verbose=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[cb], **quiet_trainer_kwargs())
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    # recompute the per-input FLOPs of the test set directly from the masks
    module.eval()
    with torch.no_grad():
        expected = torch.cat([module.profile.effective((module(x), module.masks())[1])
                              for x, _ in dm.test_dataloader()])
    report = cb.reports["test"]
    assert report["inputs"] == len(dm.test_set) == len(expected)
    assert report["summary"]["flops_mean"] == pytest.approx(expected.double().mean().item(), rel=1e-6)
    assert report["summary"]["flops_max"] == pytest.approx(expected.max().item(), rel=1e-6)
    assert report["summary"]["flops_mean_ratio"] < 1.0  # random gates at init_bias 0 turn channels off
    saved = json.loads((tmp_path / "flops.json").read_text())
    assert set(saved) == {"val", "test"}
    assert (tmp_path / "flops_layers.csv").read_text().count("\n") == 2 * len(module.profile.layers) + 1
    assert (tmp_path / "flops_hist_test.png").stat().st_size > 1000
    text = format_report(report)
    assert "saved" in text and "layer1.0.conv1" in text
    # input dependence, recomputed from the masks: unique masks per site, per-class FLOPs, the class PNG
    dep = report["dependence"]
    module.eval()
    with torch.no_grad():
        masks = [(module(x), {n: m.bool() for n, m in module.masks().items()})[1] for x, _ in dm.test_dataloader()]
    first = dp.gating_info(module.model).gated[0]
    unique = torch.cat([m[first] for m in masks]).unique(dim=0).shape[0]
    assert dep["sites"][0]["site"] == first and dep["sites"][0]["unique_masks"] == unique
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    class0 = expected[labels == 0].double().mean().item() / module.profile.dense_total
    assert dep["classes"][0]["flops_ratio"] == pytest.approx(class0, rel=1e-6)
    assert "Input dependence" in text and "p90/p10" in text
    assert (tmp_path / "flops_class_test.png").stat().st_size > 1000
    assert report["target"] is None and not report["target_missed"]


def test_a_missed_flops_target_is_reported_loudly(tmp_path) -> None:
    module = dp.GatedClassifier("resnet20", gate="sigmoid", input_size=8, width_mult=0.5, target=0.25)
    cb = dp.FlopsCallback(dirpath=str(tmp_path), plot=False, verbose=False)
    trainer = L.Trainer(callbacks=[cb], limit_test_batches=1, **quiet_trainer_kwargs())
    with pytest.warns(UserWarning, match="missed the target 0.25"):
        trainer.test(module, dp.DigitsDataModule(batch_size=50), verbose=False)
    assert cb.reports["test"]["target_missed"]  # untrained gates: every channel is still open
    assert "WARNING: mean FLOPs 1.000 of dense missed the target 0.25" in format_report(cb.reports["test"])


class _ConstantAccuracy(L.LightningModule):
    """A linear model on digits whose logged val/acc never changes: no epoch after the first improves the best."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/acc", 0.5)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_last_epoch_even_when_the_best_does_not_move(tmp_path) -> None:
    ckpt = dp.callbacks.GatedCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best",
                                        save_last=True)
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[ckpt],
                        **quiet_trainer_kwargs(enable_checkpointing=True))
    module = _ConstantAccuracy()
    trainer.fit(module, dp.DigitsDataModule())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"], best["epoch"]) == (2, 6, 0)
    assert torch.equal(last["state_dict"]["fc.weight"], module.fc.weight)


def test_histogram_keeps_the_full_range_and_names_p90_p10(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-input FLOPs within 0.496-0.502 of dense (near-static masks) must show as one bar on [0, 1], not as a
    zoomed-in spread that reads like input dependence."""
    figures = []
    monkeypatch.setattr("dynprune.callbacks.save_figure", lambda fig, path: figures.append(fig))
    ratios = torch.tensor([0.496] * 30 + [0.499] * 40 + [0.502] * 30)
    dp.FlopsCallback._histogram(tmp_path / "hist.png", ratios, "test")
    ax = figures[0].axes[0]
    assert ax.get_xlim() == (0.0, 1.0)
    p10, p90 = torch.quantile(ratios.double(), torch.tensor([0.1, 0.9], dtype=torch.double)).tolist()
    assert f"p90/p10 = {p90 / p10:.2f}" in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {f"p10 {p10:.3f}", f"p90 {p90:.3f}"}
    assert sum(patch.get_height() > 0 for patch in ax.patches) <= 2  # a spread of 0.006 in 0.02-wide bins


def _report(masks: dict[str, torch.Tensor]) -> dict:
    """A FLOPs report of ``masks`` {site: (N, U)} on 100 FLOPs per unit, as FlopsCallback builds it."""
    flops = sum(m.sum(dim=1) for m in masks.values()) * 100.0
    dense = 100 * sum(m.shape[1] for m in masks.values())
    return {"stage": "test", "inputs": len(flops), "dense_flops": dense, "gate_flops": 0,
            "summary": flops_stats(flops, dense), "layers": [],
            "dependence": input_dependence(masks, flops, None, dense)}


def test_report_says_in_words_when_the_masks_are_nearly_static() -> None:
    gen = torch.Generator().manual_seed(0)
    one_mask = {f"site{i}": (torch.arange(16) < 8).float().expand(100, 16) for i in range(8)}
    nearly = format_report(_report({**one_mask, "varies": (torch.rand(100, 16, generator=gen) < 0.5).float()}))
    assert "nearly static pruning" in nearly and "8 of 9 gated sites apply one mask to every input" in nearly
    assert "--model.batch_shaping" in nearly and "--model.logit_penalty" in nearly
    varied = {f"site{i}": (torch.rand(100, 16, generator=gen) < 0.5).float() for i in range(9)}
    assert "static pruning" not in format_report(_report(varied))
