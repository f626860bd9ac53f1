"""The latency lookup table (dynprune.runtime.profile) and ``cost: latency``: profiled through the compiled runtime,
interpolated and differentiable in the decisions, checked against the model it prices; no time is asserted."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import dynprune as dp
from dynprune.entry import main
from dynprune.objective import Objective
from dynprune.runtime.profile import LatencyTable, SiteCurve, profile_latency

CONF = Path(__file__).parent / "conf"
ROOT = Path(__file__).parent.parent
FAST = {"rounds": 1, "target_s": 1e-4, "fractions": (0.5,)}


def _gated(granularity: str = "channel") -> nn.Module:
    model = dp.backbones.create("resnet20", num_classes=10, in_chans=1, input_size=8, width_mult=0.5)
    for g in granularity.split("+"):
        model = dp.gate_model(model, gate="sigmoid", granularity=g)
    return model.eval()


def _table(sites: dict[str, SiteCurve], full_ms: float = 10.0) -> LatencyTable:
    return LatencyTable("Net", [1, 8, 8], 1, 1, "cpu", full_ms, sites)


@pytest.mark.parametrize("granularity", ["channel", "block+channel"])
def test_profile_times_each_site_over_its_grid_in_its_scope(granularity: str, tmp_path: Path) -> None:
    model = _gated(granularity)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = profile_latency(model, **FAST)
    sites = dp.gating_info(model).sites
    assert list(table.sites) == list(sites) and table.input_shape == [1, 8, 8] and table.full_ms > 0
    for name, curve in table.sites.items():
        units = sites[name].units
        assert curve.kept == ([0, 1] if units == 1 else [0, 1, units // 2, units]) and all(t > 0 for t in curve.ms)
    assert table.sites["layer1.0.conv1"].scope == "layer1.0"  # the gated conv and the conv reading it
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left unchanged
    assert all(g.forced is None for g in dp.gates_of(model).values())
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.sites == table.sites and again.full_ms == table.full_ms
    again.check(model)
    assert (tmp_path / "t.csv").read_text().count("\n") == 1 + sum(len(c.kept) for c in table.sites.values())


def test_curve_interpolates_linearly_and_is_differentiable() -> None:
    curve = SiteCurve("b", 8, [0, 4, 8], [1.0, 3.0, 4.0])
    kept = torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0], requires_grad=True)
    out = curve.at(kept)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0, 3.5, 4.0]))
    out.sum().backward()
    torch.testing.assert_close(kept.grad[[1, 3]], torch.tensor([0.5, 0.25]))


def test_cost_is_predicted_over_full_latency_and_a_skipped_block_removes_its_inner_saving() -> None:
    table = _table({"blk": SiteCurve("blk", 1, [0, 1], [1.0, 5.0]),
                    "blk.conv1": SiteCurve("blk", 4, [0, 2, 4], [3.0, 4.0, 5.0])})
    on = torch.ones(1, 1)
    half = torch.tensor([[1.0, 1, 0, 0]])
    assert table.cost({"blk": on, "blk.conv1": torch.ones(1, 4)}).item() == pytest.approx(1.0)
    assert table.predict({"blk": on, "blk.conv1": half}).item() == pytest.approx(10.0 - 1.0)
    assert table.predict({"blk": 0 * on, "blk.conv1": half}).item() == pytest.approx(10.0 - 4.0)  # t(0) - t(1)
    shares = table.site_costs({"blk": on, "blk.conv1": half})
    assert shares["blk.conv1"].item() == pytest.approx(4.0 / 10.0)


def test_objective_prices_decisions_by_the_table_with_gradients() -> None:
    model = _gated()
    sites = dp.gating_info(model).sites
    curves = {n: SiteCurve(n, s.units, [0, s.units], [0.0, 1.0]) for n, s in sites.items()}
    objective = Objective(cost="latency")
    objective.table = _table(curves, full_ms=2.0 * len(sites))
    masks = {n: torch.full((3, s.units), 0.5, requires_grad=True) for n, s in sites.items()}
    cost, ratio, site_costs = objective.costs(masks, dp.gating_info(model).flops)
    torch.testing.assert_close(cost, torch.full((3,), 0.75))  # each site saves half of its 1 ms of 2 ms
    cost.sum().backward()
    assert all(m.grad is not None and bool((m.grad > 0).all()) for m in masks.values())
    assert set(site_costs) == set(sites) and ratio.shape == (3,)


def test_objective_keeps_its_table_as_plain_data() -> None:
    objective = Objective(cost="latency")
    assert objective.table_state() is None
    objective.table = _table({"blk": SiteCurve("blk", 1, [0, 1], [1.0, 5.0])})
    again = Objective(cost="latency")
    again.load_table_state(json.loads(json.dumps(objective.table_state())))
    assert again.table == objective.table
    with pytest.raises(ValueError, match="the checkpoint's latency_table is not a dynprune latency table"):
        again.load_table_state({"format": 0})


def test_bad_tables_and_settings_are_clear_errors(tmp_path: Path) -> None:
    model = _gated()
    with pytest.raises(FileNotFoundError, match="latency table '.*nope.json' does not exist"):
        LatencyTable.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "sites": {}}))
    with pytest.raises(ValueError, match="is not a dynprune latency table"):
        LatencyTable.load(tmp_path / "bad.json")
    other = _table({"layer9.conv1": SiteCurve("layer9", 8, [0, 8], [1.0, 2.0])})
    with pytest.raises(ValueError, match=r"missing here: \['layer9.conv1'\], not in the table: \['layer1.0.conv1'"):
        other.check(model)
    sites = dp.gating_info(model).sites
    wrong = _table({n: SiteCurve(n, s.units + 1, [0, s.units + 1], [1.0, 2.0]) for n, s in sites.items()})
    with pytest.raises(ValueError, match="decide .* units; the latency table has"):
        wrong.check(model)
    with pytest.raises(ValueError, match="latency_table is read by cost: latency only, got cost 'flops'"):
        Objective(cost="flops", latency_table="t.json")
    with pytest.raises(ValueError, match="unknown cost 'time'; choose one of: flops, count, latency"):
        Objective(cost="time")
    with pytest.raises(RuntimeError, match="no latency table yet"):
        Objective(cost="latency").costs({n: torch.ones(1, s.units) for n, s in sites.items()},
                                        dp.gating_info(model).flops)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        profile_latency(model, fractions=(1.0,))


def _fit(module: dp.GatedClassifier, root: Path, steps: int = 1) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=L.pytorch.loggers.CSVLogger(root), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dp.DigitsDataModule(batch_size=8))
    return trainer


def test_cli_profiles_a_config_then_fit_trains_on_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.json"
    main(["profile-latency", "--config", str(CONF / "digits_sigmoid.yaml"), "--out", str(out), "--rounds", "1",
          "--fractions", "0.5"])
    assert "written to" in capsys.readouterr().out
    module = dp.GatedClassifier("resnet20", input_size=8, cost="latency", latency_table=str(out), target=0.8)
    assert _fit(module, tmp_path).state.finished
    assert module.objective.table.sites.keys() == LatencyTable.load(out).sites.keys()
    with pytest.raises(ValueError, match="decide .* units; the latency table has"):  # another width: other units
        dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, cost="latency", latency_table=str(out))


@pytest.mark.slow
def test_fit_without_a_table_profiles_at_fit_start(tmp_path: Path) -> None:
    module = dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, cost="latency", target=0.8)
    trainer = _fit(module, tmp_path, steps=2)
    saved = LatencyTable.load(Path(trainer.log_dir) / "latency_table.json")
    assert saved.sites.keys() == module.objective.table.sites.keys() == dp.gating_info(module.model).sites.keys()
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # a resumed run prices decisions by the same table
    resumed = dp.GatedClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert resumed.objective.table.to_dict() == module.objective.table.to_dict()


@pytest.mark.slow
def test_latency_vs_flops_experiment_writes_both_arms(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("latency_vs_flops", ROOT / "experiments" / "latency_vs_flops.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(tmp_path / "lvf")])
    with open(tmp_path / "lvf.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cost"] for r in rows] == ["flops", "latency"]
    assert float(rows[1]["target"]) == pytest.approx(float(rows[0]["predicted_latency_ratio"]))
    assert all(float(r["speedup_thin"]) > 0 and r["path"] in ("thin", "masked") for r in rows)
    assert "Kept fraction per gated layer" in (tmp_path / "lvf.md").read_text()
