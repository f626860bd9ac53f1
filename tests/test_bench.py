"""The fair benchmark harness: configs that would compare unfairly are errors, FLOPs off 1/R are errors,
the statistics are right on known numbers, the wandb export expands to the harness's own points, and the CI
config runs end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats

from dynprune.bench import FairnessError, aggregate, load_config, parse_config, run_point, welch_p, write_outputs
from dynprune.bench.cli import bench_main, export_sweep, select
from dynprune.bench.config import BenchConfig, BenchConfigError, Point
from dynprune.bench.run import check_flops, search_width
from dynprune.bench.table import check_runs, header, markdown_rows, welch_ci
from dynprune.entry import main as entry_main
from dynprune.sweep import load_sweep

CONFIGS = Path(__file__).parent.parent / "configs" / "bench"
CI = CONFIGS / "ci_tiny.yaml"


def raw_config(**changes: object) -> dict:
    """The CI config as a mapping, with top-level keys replaced."""
    raw = yaml.safe_load(CI.read_text())
    raw.update(copy.deepcopy(changes))
    return raw


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    ids = [p.id for p in cfg.points()]
    assert len(ids) == len(set(ids))
    assert ids[: len(cfg.seeds)] == [f"dense_s{s}" for s in cfg.seeds]  # the teachers come first


def test_points_pair_kd_and_cover_every_ratio_and_seed() -> None:
    cfg = parse_config(raw_config(ratios=[4, 16]))
    ids = {p.id for p in cfg.points()}
    for r in ("4", "16"):
        for s in (0, 1):
            assert {f"thin_R{r}_s{s}", f"thin+kd_R{r}_s{s}", f"dyn-sigmoid-scratch+kd_R{r}_s{s}"} <= ids
    assert {"slimmable_s0", "slimmable_s1"} <= ids and not any(i.startswith("slimmable+kd") for i in ids)


def test_a_dynamic_recipe_may_run_at_some_ratios_only() -> None:
    """``ratios`` on a dynamic arm limits its points (a recipe explored at some R) without changing any point's
    spec; a baseline must run at every R, and an R outside the config's is an error."""
    raw = raw_config(ratios=[4, 16])
    every = parse_config(raw)
    raw["arms"][-1]["ratios"] = [16]  # dyn-sigmoid-scratch
    cfg = parse_config(raw)
    ids = {p.id for p in cfg.points()}
    assert "dyn-sigmoid-scratch_R16_s0" in ids and not any(i.startswith("dyn-sigmoid-scratch_R4") for i in ids)
    assert "dyn-sigmoid-warm_R4_s0" in ids
    point = cfg.point("dyn-sigmoid-scratch+kd_R16_s1")
    assert cfg.digest(point) == every.digest(point)  # cached results stay valid
    raw["arms"][-1]["ratios"] = [8]
    with pytest.raises(BenchConfigError, match=r"ratios \[8.0\] are not among the config's ratios"):
        parse_config(raw)
    raw["arms"][-1]["ratios"] = [16]
    raw["arms"][1]["ratios"] = [16]  # thin: a baseline
    with pytest.raises(BenchConfigError, match="only a dynamic recipe may run at some R only"):
        parse_config(raw)


def test_unequal_epochs_are_an_error() -> None:
    raw = raw_config()
    raw["arms"][1]["epochs"] = 5  # thin from scratch: the budget is 2 + 4 = 6
    with pytest.raises(FairnessError, match="arm 'thin' trains 5 epochs in all.*budget is dense 2 \\+ 4 = 6"):
        parse_config(raw)
    raw["arms"][1]["epochs"] = 6  # the same budget, spelt out: fine
    assert parse_config(raw).own_epochs(parse_config(raw).arm("thin")) == 6


def test_teacher_for_only_some_arms_is_an_error() -> None:
    raw = raw_config()
    raw["arms"][0]["kd"] = [False]  # static without its +kd twin while the dynamic arms distil
    with pytest.raises(FairnessError, match="not paired: static-l1"):
        parse_config(raw)
    raw["arms"] = [a | {"kd": [True]} if a["kind"] == "dynamic" else a | {"kd": [False]} for a in raw["arms"]
                   if a["kind"] != "slimmable"]
    with pytest.raises(FairnessError, match="must run with and without it"):
        parse_config(raw)


def test_no_teacher_anywhere_is_fair() -> None:
    raw = raw_config()
    for arm in raw["arms"]:
        arm["kd"] = [False]
    assert not any(p.kd for p in parse_config(raw).points())
    assert "**Teacher:** none" in header(parse_config(raw), [])  # said, rather than describing +kd rows it lacks
    assert "**Teacher:** none" not in header(parse_config(raw_config()), [])


@pytest.mark.parametrize(("change", "message"), [
    ({"flops_tolerance": 0.05}, "looser than the protocol's 3%"),
    ({"min_seeds": 2}, "needs >= 3 seeds"),
    ({"arms": [{"name": "slimmable", "kind": "slimmable", "kd": [False, True]}]}, "cannot take the dense teacher"),
    ({"arms": [{"name": "dense", "kind": "thin"}]}, "not 'dense'"),
])
def test_unfair_settings_are_errors(change: dict, message: str) -> None:
    with pytest.raises(FairnessError, match=message):
        parse_config(raw_config(**change))


@pytest.mark.parametrize(("change", "message"), [
    ({"arms": [{"name": "x", "kind": "magic"}]}, "unknown kind 'magic'.*choose one of: static, thin"),
    ({"arms": [{"name": "x", "kind": "static", "criterion": "l3"}]}, "unknown static criterion 'l3'"),
    ({"arms": [{"name": "x", "kind": "dynamic", "model": {"gate": "sigmoid", "target": 0.3}}]}, "harness owns"),
    ({"arms": [{"name": "x", "kind": "thin", "start": "warm"}]}, "trained from scratch"),
    ({"epochs": {"dense": 2}}, "epochs must be \\{dense: D, extra: N\\}"),
    ({"ratios": [1]}, "ratios must be a list of FLOPs reductions > 1"),
    ({"seedz": [0]}, "unknown key\\(s\\) \\['seedz'\\]"),
    ({"dense_reference": [7, 7]}, "dense_reference must be a list of distinct epoch counts > 0"),
    ({"dense_reference": [0]}, "dense_reference must be"),
    ({"dense_reference": 14}, "dense_reference must be"),
])
def test_bad_configs_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(BenchConfigError, match=message):
        parse_config(raw_config(**change))


def test_a_dense_reference_trains_longer_and_is_neither_teacher_nor_baseline(tmp_path: Path) -> None:
    """``dense_reference: [E]`` adds a dense model trained E epochs from scratch per seed: its own point and
    row at R = 1, leaving every other point's spec (and the teacher, the dense model of the protocol) as it was."""
    thin = {"name": "thin", "kind": "thin", "kd": [False, True]}
    plain = parse_config(raw_config(seeds=[0], arms=[thin]))
    cfg = parse_config(raw_config(seeds=[0], arms=[thin], dense_reference=[3]))
    two = [run_line(f"dense-{e}ep", "reference", 0, 90.0, 1.0, 1.0, 1.0, epochs=e, total_epochs=e) for e in (14, 7)]
    assert [r["method"] for r in aggregate(cfg, two)] == ["dense-7ep", "dense-14ep"]  # by epochs, not by name
    assert [p.id for p in cfg.points()] == ["dense_s0", "dense-3ep_s0", "thin_R4_s0", "thin+kd_R4_s0"]
    assert all(cfg.digest(p) == plain.digest(p) for p in plain.points())
    reference = cfg.point("dense-3ep_s0")
    assert cfg.spec(reference)["epochs"] == 3 and cfg.spec(reference)["dense_epochs"] == 2
    record = run_point(cfg, reference, tmp_path)
    assert (record["epochs"], record["total_epochs"], record["kind"]) == (3, 3, "reference")
    assert not (tmp_path / "dense_s0").exists()  # the protocol's dense model is not made by a reference
    run_point(cfg, cfg.point("thin+kd_R4_s0"), tmp_path)
    teacher = json.loads((tmp_path / "dense_s0" / "result.json").read_text())
    assert teacher["epochs"] == 2 and teacher["checkpoint_digest"] == json.loads(
        (tmp_path / "thin+kd_R4_s0" / "result.json").read_text())["teacher_digest"]
    stem, rows = write_outputs(cfg, tmp_path, tmp_path / "out")
    ref_row = next(r for r in rows if r["method"] == "dense-3ep")
    assert (ref_row["kind"], ref_row["R"], ref_row["total_epochs"]) == ("reference", 1.0, 3)
    assert ref_row["best_baseline"] is None and ref_row["p_vs_best_baseline"] is None
    assert "Dense references (3 epochs" in Path(f"{stem}.md").read_text()


def test_the_markdown_rounds_each_cell_once() -> None:
    """A std of 0.2953 shows as 0.30: the csv keeps the exact values, so the md does not round 0.295 again."""
    accs = [90.0, 90.0, 90.0 + 0.2953 * math.sqrt(3)]  # sample std 0.2953
    cfg = parse_config(raw_config(seeds=[0, 1, 2]))
    rows = aggregate(cfg, [run_line("thin", "thin", s, a) for s, a in enumerate(accs)])
    assert rows[0]["acc_std"] == pytest.approx(0.2953, abs=1e-6)
    assert markdown_rows(rows)[0]["test acc"].endswith("± 0.30")


def test_flops_off_the_target_are_an_error() -> None:
    point = Point("thin", "thin", 0, 16.0)
    check_flops(point, 0.0625 * 1.029, 0.03, "val")
    with pytest.raises(FairnessError, match=r"\+3.10% off the target 1/16"):
        check_flops(point, 0.0625 * 1.031, 0.03, "val")
    with pytest.raises(FairnessError, match=r"-5.00% off"):
        check_flops(point, 0.0625 * 0.95, 0.03, "val")


def test_thin_width_search_matches_flops() -> None:
    cfg = load_config(CI)
    widths = []
    for ratio in (2, 4, 8, 16, 32):
        width, achieved = search_width(cfg, ratio)
        assert abs(achieved * ratio - 1) <= 0.03, (ratio, width, achieved)
        widths.append(width)
    assert widths == sorted(widths, reverse=True) and 0 < widths[-1] < widths[0] < 1


def test_welch_p_matches_the_formula() -> None:
    a, b = [89.86, 89.75, 89.97, 90.10], [88.62, 88.90, 88.35]
    va, vb = stats.tvar(a) / len(a), stats.tvar(b) / len(b)
    t = (sum(a) / len(a) - sum(b) / len(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert welch_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert welch_p(a, b) < 0.05 < welch_p(a, [89.0, 90.5, 91.0])
    assert welch_p([90.0], b) is None and welch_p([1.0, 1.0], [1.0, 1.0]) is None


def run_line(method: str, kind: str, seed: int, acc: float, ratio: float = 4.0, p10: float = 0.25,
             p90: float = 0.25, **extra: object) -> dict:
    """A finished run as collect_runs gives it."""
    flops = (p10 + p90) / 2
    line = {"point": f"{method}_R{ratio:g}_s{seed}", "method": method, "arm": method.removesuffix("+kd"),
            "kind": kind, "kd": method.endswith("+kd"), "seed": seed, "R": ratio, "epochs": 6, "total_epochs": 6,
            "device": "cpu", "acc": acc, "val_acc": acc, "flops_ratio": flops, "val_flops_ratio": flops,
            "flops_p10": p10, "flops_p90": p90, "class_spread": 1.0, "dynamic_frac": 0.0,
            "teacher_digest": None, "checkpoint_digest": None}
    return line | extra


def test_table_compares_with_the_strongest_baseline() -> None:
    cfg = parse_config(raw_config(seeds=[0, 1, 2]))
    accs = {"static-l1": [88.0, 88.5, 87.5], "thin": [89.9, 89.8, 90.0], "dyn": [91.0, 91.2, 90.8]}
    kinds = {"static-l1": "static", "thin": "thin", "dyn": "dynamic"}
    runs = [run_line(m, kinds[m], s, a) for m, values in accs.items() for s, a in enumerate(values)]
    # dynamic per-input FLOPs: p10/p90 of 0.2/0.3 and 0.1/0.4: the ratio of mean percentiles is 0.35/0.15
    runs[6].update(flops_p10=0.2, flops_p90=0.3)
    runs[7].update(flops_p10=0.1, flops_p90=0.4)
    rows = {r["method"]: r for r in aggregate(cfg, runs)}
    dyn = rows["dyn"]
    assert dyn["best_baseline"] == "thin" and dyn["delta_vs_best"] == pytest.approx(1.1, rel=1e-6)
    assert dyn["p_vs_best_baseline"] == pytest.approx(welch_p(accs["dyn"], accs["thin"]), rel=1e-3)
    low, high = welch_ci(accs["dyn"], accs["thin"])  # centred on the difference; excludes 0 at p < 0.05
    assert (low + high) / 2 == pytest.approx(1.1, rel=1e-6) and 0 < low < 1.1 < high
    assert (dyn["delta_ci95_low"], dyn["delta_ci95_high"]) == pytest.approx((low, high), abs=1e-3)
    assert welch_ci([90.0], accs["thin"]) is None and rows["thin"]["delta_ci95_low"] is None
    assert dyn["win"] and dyn["headline_valid"] and dyn["best_dynamic_by_val"]
    assert dyn["p90_p10"] == pytest.approx((0.3 + 0.4 + 0.25) / (0.2 + 0.1 + 0.25), rel=1e-3)
    assert rows["static-l1"]["win"] is False and rows["thin"]["p_vs_best_baseline"] is None
    two_seeds = aggregate(cfg, [r for r in runs if r["seed"] < 2])
    assert not any(r["headline_valid"] for r in two_seeds)  # fewer than 3 seeds: never a headline row
    # a recipe that kept one seed on budget is not the best dynamic one on its survivor, however high
    survivor = run_line("dyn-lucky", "dynamic", 0, 95.0)
    rows = {r["method"]: r for r in aggregate(cfg, [*runs, survivor])}
    assert rows["dyn"]["best_dynamic_by_val"] and not rows["dyn-lucky"]["best_dynamic_by_val"]


@pytest.mark.parametrize(("bad", "message"), [
    ({"total_epochs": 7}, "trained 7 epochs in all, the budget is 6"),
    ({"val_flops_ratio": 0.27}, r"\+8.00% off 1/4"),
    ({"kd": True, "teacher_digest": "other"}, "not the dense model of seed 0"),
])
def test_finished_runs_are_checked(bad: dict, message: str) -> None:
    cfg = load_config(CI)
    dense = run_line("dense", "dense", 0, 90.0, ratio=1.0, checkpoint_digest="abc")
    good = run_line("thin+kd", "thin", 0, 89.0, kd=True, teacher_digest="abc")
    check_runs(cfg, [dense, good])
    with pytest.raises(FairnessError, match=message):
        check_runs(cfg, [dense, good | bad])


def test_sweep_export_expands_to_the_harness_points(tmp_path: Path) -> None:
    cfg = load_config(CI)
    path = export_sweep(cfg, tmp_path / "sweep.yaml")
    sweep = load_sweep(path)
    assert [p["point"] for p in sweep.points()] == [p.id for p in cfg.points()]
    assert sweep.method == "grid" and "${args}" in sweep.command


def test_only_selects_points_and_rejects_unknown_patterns() -> None:
    points = load_config(CI).points()
    assert [p.id for p in select(points, ["dense_*"])] == ["dense_s0", "dense_s1"]
    with pytest.raises(BenchConfigError, match="matches no point"):
        select(points, ["nosuch_*"])


def test_cli_dry_run_lists_points(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    entry_main(["bench", str(CI), "--dry-run", "--root", str(tmp_path), "--only", "*_R4_s1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("_R4_s1" in line and "to run" in line for line in lines)
    with pytest.raises(SystemExit):
        bench_main([str(CI), "--jobs", "0"])


def test_a_rejected_point_is_not_rerun_with_the_same_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A point whose FLOPs missed 1/R is seeded and would miss again: with the same spec the runner skips it and
    says so; a rejection from another spec (or an older one without a digest) does not stop a run."""
    cfg = load_config(CI)
    point = next(p for p in cfg.points() if p.kind == "dynamic")
    root = tmp_path / cfg.name  # where the CLI puts the runs of --root tmp_path
    (root / point.id).mkdir(parents=True)
    record = {"point": point.id, "reason": "validation mean FLOPs 0.31 off the target 0.25", "chosen": {}}
    path = root / point.id / "rejected.json"
    path.write_text(json.dumps({**record, "digest": "another spec"}))
    entry_main(["bench", str(CI), "--dry-run", "--root", str(tmp_path), "--only", point.id])
    assert " to run " in capsys.readouterr().out
    path.write_text(json.dumps({**record, "digest": cfg.digest(point)}))
    entry_main(["bench", str(CI), "--dry-run", "--root", str(tmp_path), "--only", point.id])
    assert " rejected " in capsys.readouterr().out
    with pytest.raises(FairnessError, match=r"0.31 off the target .*rejected earlier with this spec"):
        run_point(cfg, point, root)  # raises before any training: no dense model is made
    assert not (root / "dense_s0").exists()


@pytest.mark.slow
def test_ci_config_runs_end_to_end(tmp_path: Path) -> None:
    """Every arm runs and the table is written. A dynamic arm may miss its FLOPs target in a run this short (how
    close it lands depends on the machine's float rounding): the harness must then reject it, never report it."""
    cfg = load_config(CI)
    rejected = set()
    for point in cfg.points():
        try:
            run_point(cfg, point, tmp_path / "runs")
        except FairnessError as err:
            assert point.kind == "dynamic" and "off the target" in str(err), err
            rejected.add(point.id)
    stem, rows = write_outputs(cfg, tmp_path / "runs", tmp_path / "out")
    methods = {r["method"] for r in rows}
    every = {"dense", "static-l1", "static-l1+kd", "thin", "thin+kd", "slimmable", "dyn-sigmoid-warm",
             "dyn-sigmoid-warm+kd", "dyn-sigmoid-scratch", "dyn-sigmoid-scratch+kd"}
    assert {m for m in every if not m.startswith("dyn-")} <= methods <= every
    assert len(rejected) < 8  # at least one dynamic point lands within 3% (8 here all did, in subprocesses)
    assert all(json.loads((tmp_path / "runs" / p / "rejected.json").read_text())["digest"] == cfg.digest(cfg.point(p))
               for p in rejected)
    for r in rows:
        assert 1 <= r["n_seeds"] <= 2 and not r["headline_valid"]  # under 3 seeds: never a headline row
        assert abs(r["flops_ratio"] * r["R"] - 1) <= 0.03
    runs = [json.loads(line) for line in Path(f"{stem}_runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 * len(every) - len(rejected)
    slim = json.loads((tmp_path / "runs" / "slimmable_s0" / "result.json").read_text())
    assert set(slim["per_ratio"]) == {f"{r:g}" for r in cfg.supernet_ratios()}  # every width it trained, any R
    md = Path(f"{stem}.md").read_text()
    assert "sklearn digits" in md and "Device:" in md and Path(f"{stem}.png").stat().st_size > 0
    assert all(f"`{point_id}`" in md for point_id in rejected)
    before = (tmp_path / "runs" / "thin_R4_s0" / "result.json").stat().st_mtime_ns
    run_point(cfg, cfg.point("thin_R4_s0"), tmp_path / "runs")  # finished: never rerun
    assert (tmp_path / "runs" / "thin_R4_s0" / "result.json").stat().st_mtime_ns == before
    _check_latency(cfg, tmp_path / "runs", tmp_path / "out", rejected)


def _check_latency(cfg: BenchConfig, root: Path, out: Path, rejected: set[str]) -> None:
    """``--latency`` times saved networks, rebuilds a static/thin architecture without one, refuses to guess a
    dynamic network without one, and the table carries the speedups (values not asserted: machine-dependent)."""
    from dynprune.bench.latency import LATENCY, measure_point

    dynamic = next(p for p in cfg.points() if p.kind == "dynamic" and p.id not in rejected)
    (root / "thin_R4_s1" / "model.pt").unlink()
    quick = {"batches": (1, 4), "images": 4, "rounds": 1, "min_run_time": 0.01}
    for point_id, source in (("static-l1_R4_s0", "saved"), ("thin_R4_s1", "rebuilt"), (dynamic.id, "saved")):
        lat = measure_point(cfg, cfg.point(point_id), root, **quick)
        assert lat is not None and lat["source"] == source
        assert json.loads((root / point_id / LATENCY).read_text()) == lat
        assert lat["b1"]["speedup"] > 0 and lat["b4"]["of_theoretical"] * cfg.point(point_id).ratio == pytest.approx(
            lat["b4"]["speedup"], rel=0.05)  # theory = 1 / FLOPs ratio, within the 3% of 1/R
    assert {"layout", "contiguous_ms", "channels_last_ms"} <= set(lat["dense_dispatch"][0])  # dense: its own layout
    from dynprune.bench.latency import measure_all

    stamp = (root / dynamic.id / LATENCY).stat().st_mtime_ns
    assert measure_all(cfg, [dynamic], root) == [] and (root / dynamic.id / LATENCY).stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):  # --retime without --latency
        bench_main([str(CI), "--retime"])
    (root / dynamic.id / "model.pt").unlink()
    assert measure_point(cfg, dynamic, root, **quick) is None  # its gates decide its time: never rebuilt
    with pytest.raises(ValueError, match="exceed"):
        measure_point(cfg, cfg.point("thin_R4_s0"), root, batches=(1, 64), images=4)
    _, rows = write_outputs(cfg, root, out)
    timed = {r["method"]: r for r in rows if r["n_timed"]}
    assert timed["static-l1"]["speedup_b1"] > 0 and timed["thin"]["latency_source"] == "rebuilt"
    assert "speedup b1 (of theory)" in Path(out / f"{cfg.stem()}.md").read_text()


def test_dense_models_of_different_seeds_start_from_different_weights(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each seed's dense model is initialised from that seed, so the table counts the dense model's variance."""
    import dynprune.bench.run as run

    real, first = run.GatedClassifier, []

    class Stop(Exception):
        pass

    def capture(*args: object, **kwargs: object) -> None:
        first.append(next(real(*args, **kwargs).parameters()).detach().clone())
        raise Stop

    monkeypatch.setattr(run, "GatedClassifier", capture)
    cfg = load_config(CI)
    for seed in (0, 1, 0):
        with pytest.raises(Stop):
            run._train_dense(cfg, Point("dense", "dense", seed), tmp_path)
    assert not first[0].equal(first[1]) and first[0].equal(first[2])
