"""LatencyReport: after ``test``, the compiled gated model is timed against its BN-folded dense twin."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import dynprune as dp
from dynprune.inject import collect_masks
from dynprune.latency import LatencyReport, dense_twin


def test_reports_measured_beside_theoretical_speedup(tmp_path) -> None:
    torch.manual_seed(0)
    module = dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, target=0.5, gate_kwargs={"init_bias": 0.0})
    report = LatencyReport(images=4, rounds=1, min_run_time=0.01)
    trainer = L.Trainer(max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[report])
    data = dp.DigitsDataModule(batch_size=4)
    trainer.fit(module, data)
    trainer.test(module, data)
    r = report.report
    assert r is not None and json.loads((tmp_path / "lightning_logs" / "version_0" / "latency.json").read_text()) == r
    x = next(iter(data.test_dataloader()))[0][:4]
    module.model.eval()(x)
    profile = module.profile
    expected = profile.dense_total / (profile.effective(collect_masks(module.model)).mean().item()
                                      + profile.gate_flops)
    assert r["theoretical_speedup"] == pytest.approx(expected, rel=1e-6)
    assert r["achieved_of_theoretical"] == pytest.approx(r["measured_speedup"] / r["theoretical_speedup"], rel=1e-9)
    assert r["images"] == 4 and r["dense_ms"] > 0 and r["compiled_ms"] > 0
    assert [b["batch"] for b in r["plan"]] == [1] and r["path"] == r["plan"][0]["path"] in ("thin", "masked")
    assert r["layout"] == r["plan"][0]["layout"] and {r["layout"], r["dense_layout"]} <= {"contiguous", "channels_last"}


def test_dense_twin_has_the_trained_weights_and_no_gates() -> None:
    module = dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5)
    twin = dense_twin(module)
    assert not hasattr(twin, "dynprune") and not any("dynprune" in k for k in twin.state_dict())
    gated = module.model.state_dict()
    assert all(torch.equal(v, gated[k]) for k, v in twin.state_dict().items())


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(ValueError, match="images must be >= 1, got 0"):
        LatencyReport(images=0)
    with pytest.raises(ValueError, match="min_run_time must be > 0, got 0"):
        LatencyReport(min_run_time=0)
