"""experiments/pareto.py: the front computation and the script on a fabricated sweep summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dynprune.io import write_csv

SCRIPT = Path(__file__).parent.parent / "experiments" / "pareto.py"
spec = importlib.util.spec_from_file_location("pareto", SCRIPT)
pareto = importlib.util.module_from_spec(spec)
sys.modules["pareto"] = pareto
spec.loader.exec_module(pareto)
P = pareto.Point


def test_front_excludes_dominated_and_duplicate_points() -> None:
    points = [P("sigmoid", 0.90, 0.8), P("sigmoid", 0.85, 0.9), P("sigmoid", 0.80, 0.4),
              P("sigmoid", 0.80, 0.4), P("sigmoid", 0.79, 0.5), P("sigmoid", 0.95, 1.0)]
    assert pareto.pareto_front(points) == [2, 0, 5]
    assert pareto.pareto_front([]) == []
    assert pareto.pareto_front([P("l1", 0.5, 0.5)]) == [0]


def test_front_keeps_the_more_accurate_of_equal_cost() -> None:
    assert pareto.pareto_front([P("l1", 0.7, 0.5), P("l1", 0.9, 0.5)]) == [1]


def test_script_on_a_fabricated_three_run_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"run": "gate-sigmoid_lam-0.1", "status": "finished", "method": "sigmoid", "lam": 0.1, "acc": 0.90,
         "flops_mean_ratio": 0.80, "flops_p90_ratio": 0.85},
        {"run": "gate-sigmoid_lam-0.5", "status": "finished", "method": "sigmoid", "lam": 0.5, "acc": 0.85,
         "flops_mean_ratio": 0.90, "flops_p90_ratio": 0.95},
        {"run": "gate-sigmoid_lam-1", "status": "finished", "method": "sigmoid", "lam": 1.0, "acc": 0.80,
         "flops_mean_ratio": 0.40, "flops_p90_ratio": 0.50},
        {"run": "gate-l1_lam-1", "status": "failed", "method": "", "lam": 1.0, "acc": "", "flops_mean_ratio": ""},
    ]
    dense = [{"run": "dense", "status": "finished", "method": "dense", "lam": 0.0, "acc": 0.92,
              "flops_mean_ratio": 1.0, "flops_p90_ratio": 1.0}]
    write_csv(tmp_path / "summary.csv", rows)
    write_csv(tmp_path / "dense.csv", dense)
    static = tmp_path / "static_pruning_resnet20.csv"
    static.write_text("model,acc,flops_reduction\nresnet20 dense,90.0,1.0\nresnet20 l1_structured 2x,89.0,2.0\n")
    out = tmp_path / "out" / "pareto"
    pareto.main([str(tmp_path / "summary.csv"), str(tmp_path / "dense.csv"), "--static", str(static),
                 "--out", str(out)])
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "pareto.md").read_text()
    lines = {line.split("|")[-2].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "✓" in lines["gate-sigmoid_lam-0.1"] and "✓" in lines["gate-sigmoid_lam-1"]
    assert "✓" not in lines["gate-sigmoid_lam-0.5"]
    assert "| dense | – | 92.00 | 1.000 |" in lines["dense"]
    assert "| static_l1_structured | – | 89.00 | 0.500 |" in lines["resnet20 l1_structured 2x"]
    assert "gate-l1_lam-1" not in table and "resnet20 dense" not in table
    assert [m for m in pareto.by_method(pareto.read_summary(tmp_path / "summary.csv"))] == ["sigmoid"]
    assert "| sigmoid | 0.5 | 85.00 | 0.900 | 0.950 |" in capsys.readouterr().out


def test_iso_flops_table_is_read_as_points(tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text("method,R,acc,flops_ratio,p90_ratio\ndense,1.0,93.05,1.0,1.0\n"
                    "static l1-filter,2.0,92.48,0.4968,0.4968\ndynamic sigmoid,2.0,92.41,0.5014,0.5156\n")
    points = pareto.read_iso(path)
    assert [p.method for p in points] == ["dense", "static_l1-filter", "dynamic_sigmoid"]
    assert points[2].acc == pytest.approx(0.9241) and points[2].flops_p90 == pytest.approx(0.5156)
    assert pareto.pareto_front(points[1:]) == [0]  # static dominates: cheaper and more accurate
