"""The benchmark harness on the ViT: token reduction (ToMe, EViT) and thin/shallow arms, the fairness rules they
obey, the CNN configs' point specs left as they were, and the CI-sized ViT config end to end through
``dynprune bench``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dynprune.bench import BenchConfigError, FairnessError, load_config, parse_config
from dynprune.bench.config import BenchConfig, Point
from dynprune.bench.run import REJECTED, RESULT, search_scale
from dynprune.data import FASHION_MNIST_DIR
from dynprune.entry import main as entry_main

CONFIGS = Path(__file__).parent.parent / "configs" / "bench"
VIT_CI = CONFIGS / "vit_ci.yaml"
# Every key a point's spec had before the ViT arms, and the keys of its arm: a cached result is reused only for an
# equal spec, so new options must stay out of the spec of every existing arm.
OLD_SPEC_KEYS = {"point", "backbone", "data", "seed", "dense_epochs", "lr", "arm", "ratio", "kd", "epochs",
                 "finetune_lr", "ratios", "kd_weight", "kd_temperature", "flops_tolerance"}
OLD_DENSE_KEYS = {"point", "backbone", "data", "seed", "dense_epochs", "lr"}
OLD_ARM_KEYS = {"name", "kind", "kd", "start", "epochs", "criterion", "model"}
# Digests of ci_tiny.yaml's points computed with the harness before the ViT arms (commit a02b15a).
CI_TINY_DIGESTS = {"dense_s0": "e5827a166b749e30", "static-l1_R4_s0": "eaed5f42b8322859",
                   "thin_R4_s0": "320e1dce5c37439c", "dyn-sigmoid-warm_R4_s0": "b62506529fc9e181",
                   "dyn-sigmoid-scratch_R4_s0": "91c28821570c5945", "slimmable_s0": "d9757b2109c7e5d1"}


def vit_raw(**changes: object) -> dict:
    """The ViT CI config as a mapping, with top-level keys replaced."""
    raw = yaml.safe_load(VIT_CI.read_text())
    raw.update(copy.deepcopy(changes))
    return raw


@pytest.mark.parametrize("name", ["resnet20_reduced", "resnet20_full", "ci_tiny"])
def test_cnn_point_specs_keep_their_keys(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    for point in cfg.points():
        spec = cfg.spec(point)
        if point.kind == "reference":  # dense references came later: their own points, with their epochs
            assert set(spec) == OLD_DENSE_KEYS | {"epochs"}, point.id
            continue
        assert set(spec) == (OLD_DENSE_KEYS if point.kind == "dense" else OLD_SPEC_KEYS), point.id
        if point.kind != "dense":
            assert set(spec["arm"]) == OLD_ARM_KEYS, point.id


def test_cnn_point_digests_are_unchanged() -> None:
    cfg = load_config(CONFIGS / "ci_tiny.yaml")
    assert {pid: cfg.digest(cfg.point(pid)) for pid in CI_TINY_DIGESTS} == CI_TINY_DIGESTS


def test_vit_specs_name_the_new_options() -> None:
    cfg = load_config(CONFIGS / "vit_reduced.yaml")
    dense = cfg.spec(cfg.point("dense_s0"))
    assert (dense["optimizer"], dense["weight_decay"], dense["gradient_clip"]) == ("adam", 5e-5, 1.0)
    assert cfg.spec(cfg.point("shallow_R3_s1"))["arm"]["scale"] == "depth"
    assert "scale" not in cfg.spec(cfg.point("thin_R3_s1"))["arm"]  # the default width: as before
    assert cfg.spec(cfg.point("tome_R2_s0"))["arm"]["method"] == "tome"
    assert cfg.digest(cfg.point("tome_R2_s0")) != cfg.digest(cfg.point("evit_R2_s0"))


def test_training_free_arms_have_the_dense_budget_and_no_teacher() -> None:
    cfg = load_config(CONFIGS / "vit_reduced.yaml")
    tome, tome_ft = cfg.arm("tome"), cfg.arm("tome-ft")
    assert tome.training_free and not tome.can_distil and cfg.budget(tome) == cfg.dense_epochs
    assert not tome_ft.training_free and tome_ft.can_distil and cfg.budget(tome_ft) == cfg.total_epochs
    assert {p.id for p in cfg.points() if p.arm == "tome"} == {f"tome_R{r}_s{s}" for r in (2, 3) for s in (0, 1, 2)}


@pytest.mark.parametrize(("arms", "error", "message"), [
    ([{"name": "tome", "kind": "reduce", "method": "tome", "epochs": 0}], FairnessError,
     "training-free.*add a reduce arm with method tome fine-tuned"),
    ([{"name": "tome", "kind": "reduce", "method": "tome", "epochs": 0},
      {"name": "evit-ft", "kind": "reduce", "method": "evit"}], FairnessError, "with method tome"),
    ([{"name": "tome", "kind": "reduce", "method": "tome", "epochs": 0, "kd": [False, True]},
      {"name": "tome-ft", "kind": "reduce", "method": "tome", "kd": [False, True]}], FairnessError,
     "training-free\\) cannot take the dense teacher"),
    ([{"name": "tome-ft", "kind": "reduce", "method": "tome", "kd": [True]}], FairnessError, "not paired: tome-ft"),
    ([{"name": "r", "kind": "reduce"}], BenchConfigError, "a reduce arm needs method, one of: tome, evit"),
    ([{"name": "r", "kind": "reduce", "method": "dynamicvit"}], BenchConfigError, "method 'dynamicvit'"),
    ([{"name": "t", "kind": "thin", "method": "tome"}], BenchConfigError, "other kinds take none"),
    ([{"name": "r", "kind": "reduce", "method": "tome", "start": "scratch"}], BenchConfigError, "start: warm"),
    ([{"name": "r", "kind": "reduce", "method": "evit", "model": {"keep_rate": 0.5}}], BenchConfigError,
     "takes no model options"),
    ([{"name": "t", "kind": "thin", "scale": "heads"}], BenchConfigError, "scale 'heads'.*width, depth"),
    ([{"name": "s", "kind": "static", "scale": "depth"}], BenchConfigError, "other kinds take no scale"),
    ([{"name": "t", "kind": "thin", "epochs": 0}], BenchConfigError, "epochs must be > 0"),
])
def test_bad_vit_arms_are_refused(arms: list, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_config(vit_raw(arms=arms))


@pytest.mark.parametrize(("change", "message"), [
    ({"backbone": "resnet20"}, "reduce the tokens of dynprune's ViT; backbone 'resnet20'"),
    ({"optim": {"optimizer": "lion"}}, "unknown optim.optimizer 'lion'; choose one of: sgd, adam"),
    ({"optim": {"weight_decay": -0.1}}, "weight_decay must be >= 0"),
    ({"optim": {"gradient_clip": 0.0}}, "gradient_clip must be > 0"),
    ({"optim": {"momentum": 0.5}}, "unknown key\\(s\\) \\['momentum'\\] in optim"),
])
def test_bad_vit_settings_are_refused(change: dict, message: str) -> None:
    with pytest.raises(BenchConfigError, match=message):
        parse_config(vit_raw(**change))


@pytest.mark.parametrize("ratio", [2.0, 3.0])
@pytest.mark.parametrize("scale", ["width", "depth"])
def test_thin_and_shallow_vits_match_the_flops(ratio: float, scale: str) -> None:
    from dynprune import backbones
    from dynprune.flops import count_flops

    cfg = load_config(CONFIGS / "vit_reduced.yaml")
    mult, achieved = search_scale(cfg, ratio, scale)
    assert abs(achieved * ratio - 1) <= cfg.flops_tolerance
    key = {"width": "width_mult", "depth": "depth_mult"}[scale]
    flops = [count_flops(backbones.create("vit", **kw), (1, 28, 28))[0] for kw in ({}, {key: mult})]
    assert flops[1] / flops[0] == pytest.approx(achieved, rel=1e-9)  # the FLOPs of the network actually built
    with pytest.raises(ValueError, match="unknown scale 'heads'"):
        search_scale(cfg, ratio, "heads")


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist missing")
def test_vit_ci_config_runs_end_to_end(tmp_path: Path) -> None:
    """Every ViT arm kind runs through ``dynprune bench --point`` and the table is written through ``--table``; every
    run lands within the tolerance of 1/R on validation (the dynamic arm by its calibrated shift), the static
    architectures on test too; the timed arms are compared against the dense ViT."""
    cfg = load_config(VIT_CI)
    root, out = tmp_path / "runs", tmp_path / "out"
    for point in cfg.points():
        entry_main(["bench", str(VIT_CI), "--point", point.id, "--root", str(root)])
    runs = root / cfg.name
    assert not list(runs.glob(f"*/{REJECTED}"))
    entry_main(["bench", str(VIT_CI), "--table", "--root", str(root), "--out", str(out)])
    stem = out / cfg.stem()
    rows = [json.loads(line) for line in Path(f"{stem}_runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"dense"} | {p.method for p in cfg.points() if p.kind != "dense"}
    for r in rows:
        if r["kind"] == "dense":
            continue
        assert abs(r["val_flops_ratio"] * r["R"] - 1) <= cfg.flops_tolerance, r["point"]
        if r["kind"] != "dynamic":
            assert r["flops_ratio"] == pytest.approx(r["val_flops_ratio"], rel=1e-9), r["point"]
        assert r["total_epochs"] == (cfg.dense_epochs if r["arm"] == "tome" else cfg.total_epochs)
    chosen = {r["method"]: r["chosen"] for r in rows}
    assert chosen["tome"]["r"] == chosen["tome-ft"]["r"] and 0 < chosen["evit-ft"]["keep_rate"] < 1
    assert 0 < chosen["shallow"]["depth_mult"] < 1 and 0 < chosen["thin"]["width_mult"] < 1
    shift = chosen["dyn-token-warm"]["budget_shift"]
    assert abs(shift["val_flops_after"] * 2 - 1) <= cfg.flops_tolerance
    md = Path(f"{stem}.md").read_text()
    assert "Training-free token reductions (tome)" in md and "token schedule: FLOPs search" in Path(
        f"{stem}.csv").read_text()
    _check_unreachable_ratio(cfg, runs)
    _check_vit_latency(cfg, runs)


def _check_unreachable_ratio(cfg: BenchConfig, runs: Path) -> None:
    """A token reduction that cannot reach 1/R within the tolerance is a FairnessError, never a point off 1/R."""
    from dynprune.bench.run import _reduced_model

    with pytest.raises(FairnessError, match="tome_R40_s0: target=40 is not reachable"):
        _reduced_model(cfg, Point("tome", "reduce", 0, 40.0), runs / "dense_s0" / "dense.ckpt")


def _check_vit_latency(cfg: BenchConfig, runs: Path) -> None:
    """``--latency``'s measurement times a token reduction as it is, a shallow ViT rebuilt from its depth and the
    compiled token-gated ViT (values not asserted: machine-dependent)."""
    from dynprune.bench.latency import measure_point

    (runs / "shallow_R2_s0" / "model.pt").unlink()
    quick = {"batches": (1, 4), "images": 4, "rounds": 1, "min_run_time": 0.01}
    for point_id, source in (("tome_R2_s0", "saved"), ("shallow_R2_s0", "rebuilt"), ("dyn-token-warm_R2_s0", "saved")):
        lat = measure_point(cfg, cfg.point(point_id), runs, **quick)
        assert lat is not None and lat["source"] == source, point_id
        assert (lat["dispatch"] is None) == point_id.startswith("tome")
        theory = 1 / json.loads((runs / point_id / RESULT).read_text())["test"]["flops_ratio"]
        assert lat["b4"]["of_theoretical"] * theory == pytest.approx(lat["b4"]["speedup"], rel=1e-9)
