"""Train the demo config (configs/fmnist_demo.yaml) once per gate family and once dense; print a table of
test accuracy, mean/p90 FLOPs ratio, FLOPs saved and training-epoch wall time relative to dense (gated
epochs only, when the config starts with ``dense_epochs``).

    .venv/bin/python experiments/gate_families.py [--config configs/fmnist_demo.yaml] [extra CLI overrides]

Writes experiments/results/gate_families.{csv,md}. Timings are ratios within one run (same machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from dynprune.callbacks import EpochTimer, FlopsCallback
from dynprune.cli import cli_main
from dynprune.io import to_markdown, write_table

RESULTS = Path(__file__).parent / "results"


def run(config: str, gate: str, root: Path, extra: list[str]) -> dict[str, object]:
    """Fit + test one gate family ('none' = dense) and collect its numbers."""
    out = root / gate
    # dense: no warm-up phase and no teacher (the dense model is what they would come from)
    dense = ["--model.dense_epochs=0", "--model.distill=0"] if gate == "none" else []
    cli = cli_main(["fit", "--config", config, f"--model.gate={'null' if gate == 'none' else gate}", *dense,
                    "--test_after_fit=true", f"--trainer.default_root_dir={out}", f"--flops.dirpath={out}",
                    "--trainer.logger=false", *extra])
    cbs = cli.trainer.callbacks
    timer = next(c for c in cbs if isinstance(c, EpochTimer))
    test = next(c for c in cbs if isinstance(c, FlopsCallback)).reports["test"]
    metrics = cli.trainer.callback_metrics
    return {"gate": gate, "lam": cli.model.hparams.lam if gate != "none" else 0.0,
            "test_acc": round(float(metrics["test/acc"]), 4),
            "flops_mean_ratio": round(test["summary"]["flops_mean_ratio"], 4),
            "flops_p90_ratio": round(test["summary"]["flops_p90_ratio"], 4),
            "flops_saved": round(test["summary"]["flops_saved"], 4),
            "epoch_s": round(statistics.median(timer.times[cli.model.hparams.get("dense_epochs", 0):]), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fmnist_demo.yaml")
    parser.add_argument("--gates", nargs="+", default=["none", "sigmoid", "l1", "policy"])
    parser.add_argument("--root", default="runs/gate_families")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args, extra = parser.parse_known_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    command = "python experiments/gate_families.py " + " ".join(
        [f"--config {args.config}", f"--gates {' '.join(args.gates)}", *extra])
    rows: list[dict[str, object]] = []
    for gate in args.gates:  # the table is rewritten after every run, so a crash keeps what finished
        rows.append(run(args.config, gate, Path(args.root), extra))
        dense = next((r["epoch_s"] for r in rows if r["gate"] == "none"), None)
        for r in rows:
            r["epoch_time_vs_dense"] = round(r["epoch_s"] / dense, 3) if dense else None
        write_table(rows, args.out / "gate_families", f"Gate families on Fashion-MNIST\n\n`{command}`")
    print(to_markdown(rows))

if __name__ == "__main__":
    main()
