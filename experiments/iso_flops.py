"""Static vs dynamic pruning at equal FLOPs on Fashion-MNIST, every method in the same training loop.

1. Train the dense backbone for ``--epochs`` (GatedClassifier with gate=None).
2. For each reduction R and each method, ``--finetune-epochs`` more epochs from the dense weights, with
   the same Lightning loop, optimiser (SGD, nesterov), per-epoch cosine schedule, lr and data; only the
   method differs:
   - ``static``: L1-filter pruned to 1/R FLOPs and physically thinned, then fine-tuned;
   - dynamic variants (``--variants``, see VARIANTS): gated copies warm-started from the dense weights
     with ``target = 1/R``.
3. Test accuracy, mean FLOPs ratio, p10/p90 per-input FLOPs and their ratio, fraction of dynamic units
   and the per-class FLOPs spread go to experiments/results/iso_flops_<backbone>.{csv,md}; a row whose
   mean FLOPs miss 1/R by more than 0.05 is marked ``missed``.

    python experiments/iso_flops.py --ratios 2 4 8 --variants sigmoid l1 gumbel policy block \\
        --train-subset 10000 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

import dynprune as dp
from dynprune.io import atomic_write, to_markdown, write_table
from dynprune.static import fraction_for_flops, prune_model, remove_channels

# Named dynamic recipes: GatedClassifier arguments on top of the shared ones.
VARIANTS: dict[str, dict[str, Any]] = {
    "sigmoid": {"gate": "sigmoid"},
    "l1": {"gate": "l1"},
    "l1+hard0.5": {"gate": "l1", "hard_finetune": 0.5},
    "gumbel": {"gate": "gumbel"},
    "policy": {"gate": "policy"},
    "block": {"gate": "sigmoid", "granularity": "block"},
    "width": {"gate": "sigmoid", "granularity": "width"},
    "width+kd+targets": {"gate": "sigmoid", "granularity": "width", "distill": 1.0, "width_targets": 1.0},
    "block+channel": {"gate": "sigmoid", "granularity": ["block", "channel"]},
    "sigmoid+kd": {"gate": "sigmoid", "distill": 1.0},
    "sigmoid+kd+shaping": {"gate": "sigmoid", "distill": 1.0, "batch_shaping": 0.5, "batch_shaping_warmup": 0.5},
    "gumbel+kd+budget": {"gate": "gumbel", "distill": 1.0, "budget": 5.0},
    "block+channel+kd": {"gate": "sigmoid", "granularity": ["block", "channel"], "distill": 1.0},
    "block+channel+kd+shaping": {"gate": "sigmoid", "granularity": ["block", "channel"], "distill": 1.0,
                                 "batch_shaping": 0.5, "batch_shaping_warmup": 0.5},
    "sigmoid+kd+shaping1": {"gate": "sigmoid", "distill": 1.0, "batch_shaping": 1.0, "batch_shaping_warmup": 0.5},
    "sigmoid+kd+shaping2": {"gate": "sigmoid", "distill": 1.0, "batch_shaping": 2.0, "batch_shaping_warmup": 0.8},
    "sigmoid+kd+shaping3": {"gate": "sigmoid", "distill": 1.0, "batch_shaping": 3.0, "batch_shaping_warmup": 0.8},
    "sigmoid+kd+shaping5": {"gate": "sigmoid", "distill": 1.0, "batch_shaping": 5.0, "batch_shaping_warmup": 0.8},
    "sigmoid+kd+logit": {"gate": "sigmoid", "distill": 1.0, "logit_penalty": 0.1, "logit_penalty_warmup": 0.8},
    "sigmoid+kd+logit0.03": {"gate": "sigmoid", "distill": 1.0, "logit_penalty": 0.03, "logit_penalty_warmup": 0.8},
    "sigmoid+kd+logit-short": {"gate": "sigmoid", "distill": 1.0, "logit_penalty": 0.1, "logit_penalty_warmup": 0.3},
    "sigmoid+kd+logit0.3-short": {"gate": "sigmoid", "distill": 1.0, "logit_penalty": 0.3,
                                  "logit_penalty_warmup": 0.3},
    "block+channel+kd+logit": {"gate": "sigmoid", "granularity": ["block", "channel"], "distill": 1.0,
                               "logit_penalty": 0.1, "logit_penalty_warmup": 0.8},
}
TOLERANCE = 0.05


def trainer(epochs: int, device: str, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """The one training loop every method uses."""
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=callbacks or [], accelerator="gpu" if device.startswith("cuda") else "cpu",
                     devices=1)


def run(module: dp.GatedClassifier, dm: L.LightningDataModule, epochs: int, device: str,
        dense_flops: int) -> dict[str, Any]:
    """Fit, then test with a FlopsCallback; the test report (summary + input dependence), FLOPs as ratios
    of ``dense_flops`` (a physically pruned model's own dense count is smaller than the original's)."""
    cb = dp.FlopsCallback(plot=False, verbose=False, dirpath=tempfile.mkdtemp(prefix="iso_flops_"))
    if epochs > 0:
        trainer(epochs, device).fit(module, dm)
    tester = trainer(1, device, [cb])
    result = tester.test(module, dm, verbose=False)[0]
    report = cb.reports["test"]
    dep = report.get("dependence") or {}
    s = report["summary"]
    return {"acc": round(100 * result["test/acc"], 2), "flops_ratio": round(s["flops_mean"] / dense_flops, 4),
            "p10_ratio": round(s["flops_p10"] / dense_flops, 4), "p90_ratio": round(s["flops_p90"] / dense_flops, 4),
            "p90_p10": round(s["flops_p90"] / s["flops_p10"], 3) if s["flops_p10"] else None,
            "dynamic_frac": round(dep.get("dynamic_frac", 0.0), 3),
            "class_spread": round(dep["class_spread"], 3) if dep.get("class_spread") else None}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (± std over seeds) of a method's per-seed rows."""
    out = dict(rows[0])
    accs = [r["acc"] for r in rows]
    out["acc"] = round(statistics.mean(accs), 2)
    out["acc_std"] = round(statistics.stdev(accs), 2) if len(accs) > 1 else None
    for key in ("flops_ratio", "p10_ratio", "p90_ratio", "p90_p10", "dynamic_frac", "class_spread"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(statistics.mean(values), 4) if values else None
    out["seeds"] = len(rows)
    return out


def table_rows(runs: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """Finished runs (``method``, ``ratio``, ``seed``, ``epochs`` + a :func:`run` row each) aggregated per
    (method, R, epochs) over seeds; a method trained for other than ``epochs`` epochs is labelled
    ``<method> N=<epochs>``, and a row whose mean FLOPs miss 1/R by more than TOLERANCE is marked ``missed``."""
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for run_ in runs:
        groups.setdefault((run_["method"], run_["ratio"], run_["epochs"]), []).append(run_)
    rows = []
    for (method, ratio, n), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "static l1-filter",
                                                                               kv[0][0], kv[0][2])):
        if method == "dense":
            group = group[:1]  # the same checkpoint tested by each invocation
        agg = aggregate([{k: v for k, v in r.items() if k not in ("method", "ratio", "seed", "epochs", "seconds")}
                         for r in group])
        label = method if n in (0, epochs) else f"{method} N={n}"
        missed = ratio > 1 and abs(agg["flops_ratio"] - 1 / ratio) > TOLERANCE
        rows.append({"method": label, "R": ratio, "target": round(1 / ratio, 4), "N": n, **agg, "missed": missed,
                     "seed_list": " ".join(str(r["seed"]) for r in group)})
    return rows


def tabulate(paths: list[Path], stem: Path, title: str, epochs: int) -> list[dict[str, Any]]:
    """The table of the finished runs in ``*_runs.jsonl`` files (see :func:`table_rows`), written and printed."""
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    rows = table_rows(runs, epochs)
    write_table(rows, stem, title)
    print(to_markdown(rows))
    return rows


def dense_module(backbone: str, lr: float) -> dp.GatedClassifier:
    """The dense backbone every method starts from."""
    return dp.GatedClassifier(backbone, gate=None, lr=lr)


def execute(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One (seed, R, method) run from the dense checkpoint; returns (job, result row). Runs in a worker
    process when ``--workers`` > 1, so it rebuilds everything from the job's plain arguments."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    L.seed_everything(job["seed"])
    dm = dp.FashionMNISTDataModule(job["data_dir"], batch_size=128, train_subset=job["train_subset"],
                                   seed=job["seed"])
    dense = dense_module(job["backbone"], job["lr"])
    dense.load_state_dict(torch.load(job["dense_path"], weights_only=True)["state_dict"])
    dense_flops = dense.profile.dense_total
    ratio, method, epochs = job["ratio"], job["method"], job["epochs"]
    start = time.time()
    if method == "dense":
        row = run(dense, dm, 0, job["device"], dense_flops)
    elif method == "static l1-filter":
        backbone = copy.deepcopy(dense.model).cpu()
        fraction = fraction_for_flops(backbone, ratio, dense.profile.input_shape)
        small = remove_channels(prune_model(backbone, "l1_structured", fraction))
        static = dp.GatedClassifier(small, gate=None, lr=job["finetune_lr"])
        row = run(static, dm, epochs, job["device"], dense_flops)
    else:
        variant = method.removeprefix("dynamic ")
        teacher = dense if VARIANTS[variant].get("distill", 0) > 0 else None  # the +kd recipes distil from it
        module = dp.GatedClassifier(job["backbone"], lam=job["lam"], target=1 / ratio, init_from=str(job["dense_path"]),
                                    teacher=teacher, lr=job["finetune_lr"], **VARIANTS[variant])
        row = run(module, dm, epochs, job["device"], dense_flops)
    row["seconds"] = round(time.time() - start, 1)
    return job, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--ratios", type=float, nargs="*", default=[2.0, 4.0, 8.0])
    parser.add_argument("--variants", nargs="*", default=["sigmoid", "l1", "gumbel", "policy", "block"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--lam", type=float, default=2.0, help="weight of |FLOPs ratio - target| for the gates")
    parser.add_argument("--train-subset", type=int, default=0)
    parser.add_argument("--data-dir", default=dp.data.FASHION_MNIST_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--skip-static", action="store_true", help="only the dynamic variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel processes (jobs start in order: seed, then R, then method)")
    parser.add_argument("--dense-ckpt", type=Path, default=None,
                        help="reuse this dense checkpoint (a state_dict of GatedClassifier(gate=None)) instead of "
                             "training the dense model; its test accuracy is still measured")
    parser.add_argument("--from-runs", type=Path, nargs="+", default=None,
                        help="only tabulate: aggregate the per-run lines of these *_runs.jsonl files (mean +- std "
                             "over seeds) into iso_flops_<backbone><tag>.{csv,md}")
    parser.add_argument("--title", default="", help="with --from-runs: the table's title")
    parser.add_argument("--save-dense", type=Path, default=None,
                        help="train the dense model (seed: the first of --seeds), save it here and stop")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.out / f"iso_flops_{args.backbone}{args.tag}"
    runs: list[dict[str, Any]] = []
    start = time.time()
    title = (f"Static vs dynamic at equal FLOPs, {args.backbone} on Fashion-MNIST (train subset "
             f"{args.train_subset or 'all'}; dense {args.epochs} ep, then {args.finetune_epochs} ep for every method "
             f"in the same loop: SGD nesterov, per-epoch cosine, lr {args.finetune_lr}; lam={args.lam}; "
             f"device {args.device}; seeds {args.seeds})")

    def record(job: dict[str, Any], row: dict[str, Any]) -> None:
        run_ = {**{k: job[k] for k in ("method", "ratio", "seed", "epochs")}, **row}
        with open(f"{stem}_runs.jsonl", "a") as f:  # every finished run, one line each
            f.write(json.dumps(run_) + "\n")
        runs.append(run_)
        print(run_, f"{time.time() - start:.0f}s", flush=True)
        write_table(table_rows(runs, args.finetune_epochs), stem, title)  # keep what finished

    if args.from_runs:
        tabulate(args.from_runs, stem, args.title or title, args.finetune_epochs)
        return
    dense_path = args.dense_ckpt
    if dense_path is None:
        L.seed_everything(args.seeds[0])
        dm = dp.FashionMNISTDataModule(args.data_dir, batch_size=128, train_subset=args.train_subset,
                                       seed=args.seeds[0])
        dense = dense_module(args.backbone, args.lr)
        row = run(dense, dm, args.epochs, args.device, dense.profile.dense_total)
        dense_path = args.save_dense or Path(tempfile.mkdtemp(prefix="iso_dense_")) / "dense.ckpt"
        dense_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dense_path, lambda f: torch.save({"state_dict": dense.cpu().state_dict()}, f), mode="wb")
        print(f"dense: {row}; saved {dense_path}", flush=True)
        if args.save_dense:
            return
    base = {"backbone": args.backbone, "data_dir": args.data_dir, "train_subset": args.train_subset,
            "device": args.device, "threads": args.threads, "lr": args.lr, "finetune_lr": args.finetune_lr,
            "lam": args.lam, "dense_path": str(dense_path), "epochs": args.finetune_epochs}
    methods = ([] if args.skip_static else ["static l1-filter"]) + [f"dynamic {v}" for v in args.variants]
    jobs = [{**base, "method": "dense", "ratio": 1.0, "seed": args.seeds[0], "epochs": 0}]
    jobs += [{**base, "method": m, "ratio": r, "seed": s} for s in args.seeds for r in args.ratios for m in methods]
    if args.workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, maxtasksperchild=None) as pool:
            for job, row in pool.imap_unordered(execute, jobs, chunksize=1):
                record(job, row)
    else:
        for job in jobs:
            record(*execute(job))
    print(to_markdown(table_rows(runs, args.finetune_epochs)))


if __name__ == "__main__":
    main()
