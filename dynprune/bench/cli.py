"""``dynprune bench``: run a benchmark YAML point by point, resumable, and write its table.

    dynprune bench configs/bench/resnet20_reduced.yaml [--jobs 2] [--only 'dense_*' '*_R4_*'] [--dry-run]
    dynprune bench configs/bench/resnet20_reduced.yaml --table            # only rebuild the table
    dynprune bench configs/bench/resnet20_reduced.yaml --export-sweep sweep.yaml   # for `wandb agent`
    dynprune bench configs/bench/resnet20_reduced.yaml --point thin+kd_R4_s0       # one point, here

Each point runs in its own subprocess (``--point``) through the sweep runner's process handling (own
process group, log in ``<root>/<point>/run.log``, ended with the runner), ``--jobs`` at a time; the table is
rewritten after every finished point. A finished point is never rerun; an interrupted run resumes where it
stopped. One runner per ``--root`` (the sweep runner's lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from dynprune.bench.config import BenchConfig, BenchConfigError, FairnessError, Point, load_config
from dynprune.bench.run import finished, point_state, run_point
from dynprune.bench.table import write_outputs
from dynprune.sweep import run_logged, sweep_lock

DEFAULT_ROOT = "runs/bench"
DEFAULT_OUT = "experiments/results"


def select(points: list[Point], only: Sequence[str] | None) -> list[Point]:
    """Points whose id matches one of the ``only`` glob patterns (all without patterns); a pattern that
    matches nothing is an error."""
    if not only:
        return points
    for pattern in only:
        if not any(fnmatch.fnmatchcase(p.id, pattern) for p in points):
            raise BenchConfigError(f"--only pattern {pattern!r} matches no point; e.g. "
                                   f"{', '.join(p.id for p in points[:5])}")
    return [p for p in points if any(fnmatch.fnmatchcase(p.id, pat) for pat in only)]


def point_command(cfg: BenchConfig, point: Point, root: Path) -> list[str]:
    """The command that runs one point in a fresh process (``root`` is ``--root``/<config name>)."""
    return [sys.executable, "-m", "dynprune", "bench", cfg.path, "--point", point.id, "--root", str(root.parent),
            "--accelerator", cfg.accelerator]


def export_sweep(cfg: BenchConfig, path: str | os.PathLike[str], root: str = DEFAULT_ROOT) -> Path:
    """A wandb sweep YAML (grid over the point ids) whose runs are exactly the harness's points."""
    sweep = {
        "name": f"bench_{cfg.name}", "method": "grid",
        "description": f"dynprune bench {cfg.path}: one run per point (wandb agent on many machines)",
        "command": ["${env}", "${interpreter}", "-m", "dynprune", "bench", cfg.path, "--root", root, "${args}"],
        "parameters": {"point": {"values": [p.id for p in cfg.points()]}},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_bench(cfg: BenchConfig, points: list[Point], root: Path, out: Path, jobs: int = 1,
              echo: Callable[[str], None] = print) -> list[str]:
    """Run the unfinished ``points``, ``jobs`` subprocesses at a time, rewriting the table after each;
    returns what failed: point ids (their run.log says why) and a table the finished runs could not make."""
    states = [point_state(cfg, p, root) for p in points]
    todo = [p for p, state in zip(points, states, strict=True) if state == "to run"]
    echo(f"{states.count('finished')} of {len(points)} point(s) finished earlier, {states.count('rejected')} "
         f"rejected earlier with the same spec (off 1/R; delete their rejected.json to rerun); {len(todo)} to run, "
         f"{jobs} at a time")
    failed: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with sweep_lock(root), ThreadPoolExecutor(jobs) as pool:
        start = time.time()
        futures = {}
        for p in todo:
            (root / p.id).mkdir(parents=True, exist_ok=True)
            futures[pool.submit(run_logged, point_command(cfg, p, root), root / p.id, env)] = p
        for future in as_completed(futures):
            p, rc = futures[future], future.result()
            if rc == 0 and finished(cfg, p, root) is not None:
                echo(f"[{time.time() - start:6.0f} s] {p.id}: done")
            else:
                failed.append(p.id)
                tail = (root / p.id / "run.log").read_text().splitlines()[-3:]
                echo(f"[{time.time() - start:6.0f} s] {p.id}: FAILED (exit {rc}): " + " | ".join(tail))
            try:
                write_outputs(cfg, root, out)
            except (FairnessError, ValueError) as err:  # keep running the points; the exit code says it
                failed.append(f"table ({err})")
                echo(f"table not written: {err}")
    return failed


def bench_main(argv: Sequence[str] | None = None) -> None:
    """``dynprune bench CONFIG.yaml [--jobs N] [--only PATTERN ...] [--dry-run] [--table] [--export-sweep F]``."""
    parser = argparse.ArgumentParser(prog="dynprune bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a benchmark YAML (configs/bench/*.yaml)")
    parser.add_argument("--jobs", type=int, default=1, help="points run at the same time (subprocesses)")
    parser.add_argument("--only", nargs="+", default=None, help="glob patterns of point ids, e.g. 'dense_*' '*_R4_*'")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="runs and dense checkpoints go to ROOT/<point>")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the table goes to OUT/bench_<backbone>_<protocol>.*")
    parser.add_argument("--dry-run", action="store_true", help="list the points still to run, run nothing")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the finished points")
    parser.add_argument("--export-sweep", default=None, metavar="FILE", help="write the points as a wandb sweep YAML")
    parser.add_argument("--latency", action="store_true",
                        help="time the finished points (compiled, against their seed's dense model, batch 1 and 64) "
                             "not yet timed, then rebuild the table; run on a quiet machine")
    parser.add_argument("--retime", action="store_true",
                        help="with --latency: time again the points already timed (e.g. after a runtime change)")
    parser.add_argument("--point", default=None, help="run this one point in this process (what each job runs)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default=None,
                        help="override the config's accelerator (not part of a point's spec: results are reused)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.retime and not args.latency:
        parser.error("--retime times finished points again: give --latency too")
    try:
        cfg = load_config(args.config)
        if args.accelerator:
            cfg = dataclasses.replace(cfg, accelerator=args.accelerator)
        root = Path(args.root) / cfg.name
        if args.point:
            run_point(cfg, cfg.point(args.point), root)
            return
        if args.export_sweep:
            print(f"wrote {export_sweep(cfg, args.export_sweep, args.root)} ({len(cfg.points())} points)")
            return
        points = select(cfg.points(), args.only)
    except BenchConfigError as err:
        parser.error(str(err))
    if args.latency:
        from dynprune.bench.latency import measure_all

        untimed = measure_all(cfg, points, root, refresh=args.retime)
        if untimed:
            print(f"not timed (dynamic points finished before models were saved; rerun them): {', '.join(untimed)}")
    if args.table or args.latency:
        stem, rows = write_outputs(cfg, root, args.out)
        print(f"wrote {stem}.md ({len(rows)} rows)")
        return
    if args.dry_run:
        for p in points:
            print(f"{p.id:<36} {point_state(cfg, p, root):<9} {shlex.join(point_command(cfg, p, root))}")
        return
    failed = run_bench(cfg, points, root, Path(args.out), args.jobs)
    if failed:
        print(f"dynprune bench: {len(failed)} point(s) failed: {', '.join(failed)}; see <root>/<point>/run.log "
              "(run the same command again to retry them)", file=sys.stderr)
        raise SystemExit(1)
