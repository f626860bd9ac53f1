"""Run a wandb sweep YAML locally (``grid`` / ``random``) where no wandb server is reachable.

    dynprune sweep configs/sweeps/lam.yaml [--count N] [--root runs] [--dry-run]

The YAML is in wandb's sweep format and works unchanged with ``wandb sweep`` + ``wandb agent``. Each point
runs the sweep's ``command`` (macros ``${env} ${interpreter} ${program} ${args}`` ... filled in as the agent
does, except that ``${interpreter}`` is this Python) in a subprocess, in its own run dir
``<root>/<sweep name>/<run id>`` named after the swept values. To each run's args the runner adds
``trainer.default_root_dir`` and ``flops.dirpath`` (the run dir) and a :class:`RunSummary` callback, which
writes the run's final metrics to ``metrics.json`` (offline wandb keeps no readable summary). After every
run ``summary.csv`` (one row per run: method, gate, lam, acc, mean/p90 FLOPs ratio, ...) is rewritten
atomically. A finished run leaves ``sweep_run.json``; running the sweep again skips those points, so an
interrupted sweep resumes where it stopped.

Safety: the sweep ``name`` must be a plain folder name (it is refused otherwise), so every run stays under
``--root``. One runner per sweep folder: a second one exits naming the first (an ``fcntl`` lock on
``<root>/<name>/.sweep.lock``, released by the OS however the runner ends). Before any point is launched, every
point of a ``dynprune`` command is parsed by the CLI (``--print_config``), so an unknown key fails first. Each
point runs in its own process group: a runner stopped by SIGINT/SIGTERM/SIGHUP ends that group, and a runner
killed outright (SIGKILL) takes its direct child with it (Linux ``PR_SET_PDEATHSIG``). The sweep YAML's
``command`` runs programs by design: run only sweep files you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

from dynprune.io import read_yaml, write_csv, write_json

TOP_KEYS = ("program", "method", "metric", "parameters", "command", "name", "description", "project", "entity",
            "early_terminate", "run_cap")
METHODS = ("grid", "random", "bayes")
PARAM_KEYS = ("value", "values", "probabilities", "distribution", "min", "max", "mu", "sigma", "q")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values", "normal", "log_normal")
ARG_MACROS = ("args", "args_no_hyphens", "args_no_boolean_flags", "args_no_equals", "args_json")
MACROS = ("env", "interpreter", "program", "args_json_file", *ARG_MACROS)
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


class SweepConfigError(ValueError):
    """A sweep YAML that the local runner cannot run; the message names the offending key."""


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: ``parameters`` maps a dotted config key to its wandb spec (distribution filled in)."""

    name: str
    method: str
    parameters: dict[str, dict[str, Any]]
    command: tuple[str, ...] = DEFAULT_COMMAND
    program: str | None = None
    metric: dict[str, str] | None = None
    run_cap: int | None = None

    def swept(self) -> list[str]:
        """Parameters that take more than one value (they name the runs)."""
        return [k for k, spec in self.parameters.items() if spec["distribution"] != "constant"
                and not (spec["distribution"] == "categorical" and len(spec["values"]) == 1)]

    def points(self, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """The grid in YAML order (first ``count``), or ``count`` seeded random samples (the same on every call)."""
        count = count if count is not None else self.run_cap
        if self.method == "grid":
            axes = [_grid_values(k, spec) for k, spec in self.parameters.items()]
            grid = [dict(zip(self.parameters, combo, strict=True)) for combo in itertools.product(*axes)]
            return grid[:count] if count is not None else grid
        if count is None:
            raise SweepConfigError("method: random needs --count N (or run_cap in the sweep YAML)")
        rng = np.random.default_rng(seed)
        return [{k: _sample(spec, rng) for k, spec in self.parameters.items()} for _ in range(count)]

    def run_ids(self, points: Sequence[dict[str, Any]]) -> list[str]:
        """Directory-safe run names from the swept values, e.g. ``gate-sigmoid_lam-0.5`` (made unique)."""
        keys = self.swept()
        short = {k: k.rsplit(".", 1)[-1] for k in keys}
        if len(set(short.values())) < len(short):
            short = {k: k for k in keys}
        ids: list[str] = []
        for point in points:
            rid = "_".join(f"{short[k]}-{_format(point[k])}" for k in keys) or "run"
            rid = re.sub(r"[^A-Za-z0-9_.+=-]", "-", rid)
            n, base = 2, rid
            while rid in ids:
                rid, n = f"{base}-{n}", n + 1
            ids.append(rid)
        return ids

    def command_for(self, point: dict[str, Any], run_dir: Path) -> list[str]:
        """The command a wandb agent would run for ``point``, plus the run-dir settings and RunSummary."""
        args = {**point, "trainer.default_root_dir": str(run_dir), "flops.dirpath": str(run_dir),
                "trainer.callbacks+": f"{__name__}.RunSummary"}
        formats = _arg_formats(args)
        fill = {"env": ["/usr/bin/env"] if os.path.exists("/usr/bin/env") else [], "interpreter": [sys.executable],
                "program": [self.program or ""], "args_json_file": [str(run_dir / "args.json")], **formats}
        if "${args_json_file}" in self.command:
            write_json(run_dir / "args.json", args)
        out: list[str] = []
        for chunk in self.command:
            macro = chunk[2:-1] if chunk.startswith("${") and chunk.endswith("}") else None
            if macro in fill:
                out += fill[macro]
            else:
                out.append(ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), chunk))
        return out


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _arg_formats(args: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument formats: ``--k=v``, ``k=v``, ``--k`` for true booleans, ``--k v``, JSON."""
    flags = [f"--{k}={v}" for k, v in args.items()]
    return {
        "args": flags,
        "args_no_hyphens": [f"{k}={v}" for k, v in args.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in args.items() if v is not False],
        "args_no_equals": [s for k, v in args.items() for s in (f"--{k}", str(v))],
        "args_json": [json.dumps(args)],
    }


def _grid_values(key: str, spec: dict[str, Any]) -> list[Any]:
    dist = spec["distribution"]
    if dist == "constant":
        return [spec["value"]]
    if dist == "categorical":
        return list(spec["values"])
    if dist == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    raise SweepConfigError(f"method: grid cannot enumerate parameters.{key} (distribution: {dist}); "
                           "give it 'values', or use method: random")


def _sample(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    """One draw from a wandb parameter spec."""
    dist = spec["distribution"]
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        values = spec["values"]
        return values[int(rng.choice(len(values), p=spec.get("probabilities")))]
    if dist == "int_uniform":
        return int(rng.integers(spec["min"], spec["max"] + 1))
    if dist in ("normal", "log_normal"):
        x = float(rng.normal(spec.get("mu", 0.0), spec.get("sigma", 1.0)))
        return math.exp(x) if dist == "log_normal" else x
    lo, hi = float(spec["min"]), float(spec["max"])
    if dist in ("log_uniform_values", "q_log_uniform_values"):
        lo, hi = math.log(lo), math.log(hi)
    x = float(rng.uniform(lo, hi))
    if dist.startswith("log_uniform") or dist == "q_log_uniform_values":
        x = math.exp(x)
    if dist.startswith("q_"):
        q = spec.get("q", 1.0)
        x = round(x / q) * q
    return x


def _check_parameter(key: str, spec: Any) -> dict[str, Any]:
    """Validate one wandb parameter spec and fill in its distribution the way wandb infers it."""
    where = f"parameters.{key}"
    if not isinstance(spec, dict):
        raise SweepConfigError(f"{where} must be a mapping such as {{values: [...]}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepConfigError(f"{where}: nested parameters are not supported locally; use dotted keys "
                               f"such as {key}.lam")
    for k in spec:
        if k not in PARAM_KEYS:
            raise SweepConfigError(f"unknown key '{k}' in {where}; allowed: {', '.join(PARAM_KEYS)}")
    spec = dict(spec)
    dist = spec.get("distribution")
    if dist is None:
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical"
        elif "min" in spec and "max" in spec:
            dist = "int_uniform" if all(isinstance(spec[b], int) for b in ("min", "max")) else "uniform"
        else:
            raise SweepConfigError(f"{where} needs 'value', 'values' or 'min'/'max'")
    if dist not in DISTRIBUTIONS:
        raise SweepConfigError(f"unknown distribution '{dist}' in {where}; choose one of: {', '.join(DISTRIBUTIONS)}")
    needs = {"constant": ("value",), "categorical": ("values",), "normal": (), "log_normal": ()}
    needs = needs.get(dist, ("min", "max"))
    for k in needs:
        if k not in spec:
            raise SweepConfigError(f"{where} (distribution: {dist}) needs '{k}'")
    if dist == "categorical" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise SweepConfigError(f"{where}.values must be a non-empty list, got {spec['values']!r}")
    if "min" in needs and not spec["min"] <= spec["max"]:
        raise SweepConfigError(f"{where}: min {spec['min']} > max {spec['max']}")
    spec["distribution"] = dist
    return spec


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and validate a wandb sweep YAML; errors name the bad key and the allowed values."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file {path} not found")
    try:
        cfg = read_yaml(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise SweepConfigError(f"YAML error in {where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(cfg, dict):
        raise SweepConfigError(f"{path} must hold a mapping with program/method/parameters/command")
    for key in cfg:
        if key not in TOP_KEYS:
            raise SweepConfigError(f"unknown sweep key '{key}' in {path}; allowed: {', '.join(TOP_KEYS)}")
    method = cfg.get("method")
    if method not in METHODS:
        raise SweepConfigError(f"method must be one of: {', '.join(METHODS)}; got {method!r}")
    if method == "bayes":
        raise SweepConfigError("method: bayes needs wandb's sweep server; run it with "
                               f"`wandb sweep {path}` then `wandb agent <sweep id>` (locally: grid or random)")
    params = cfg.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepConfigError(f"'parameters' must be a non-empty mapping of config keys, got {params!r}")
    parameters = {str(k): _check_parameter(str(k), v) for k, v in params.items()}
    command = cfg.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise SweepConfigError(f"'command' must be a list of strings, got {command!r}")
    command = tuple(str(c) for c in command)
    for chunk in command:
        if chunk.startswith("${") and chunk.endswith("}") and chunk[2:-1] not in MACROS:
            raise SweepConfigError(f"unknown macro {chunk} in 'command'; known: {', '.join(MACROS)}")
    if not any(c[2:-1] in ARG_MACROS for c in command):
        raise SweepConfigError("'command' must pass the parameters with ${args} (or another ${args...} macro)")
    program = cfg.get("program")
    if "${program}" in command and not program:
        raise SweepConfigError("'command' uses ${program} but 'program' is not set")
    metric = cfg.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or "name" not in metric:
            raise SweepConfigError(f"'metric' must be a mapping with 'name' (and 'goal'), got {metric!r}")
        metric = {"name": str(metric["name"]), "goal": metric.get("goal", "minimize")}
        if metric["goal"] not in ("minimize", "maximize"):
            raise SweepConfigError(f"metric.goal must be minimize or maximize, got {metric['goal']!r}")
    run_cap = cfg.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepConfigError(f"run_cap must be a positive integer, got {run_cap!r}")
    name = str(cfg.get("name") or path.stem)
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise SweepConfigError(f"sweep name {name!r} in {path} must be a plain folder name (letters, digits and "
                               "_ . + = -, not starting with '.', no '..'): runs go to <root>/<name>")
    return Sweep(name=name, method=method, parameters=parameters, command=command, program=program,
                 metric=metric, run_cap=run_cap)


def method_label(gate: str | None, callbacks: Sequence[object] = ()) -> str:
    """What a run is, for plots and tables: the gate family, ``static_<method>``, or ``dense``."""
    if gate:
        return gate
    static = [cb for cb in callbacks if type(cb).__name__ == "StaticPruning"]
    return f"static_{static[0].method}" if static else "dense"


class RunSummary(L.Callback):
    """Write the run's latest metrics (``trainer.callback_metrics``) and hyperparameters to
    ``<default_root_dir>/<filename>`` after every validation, fit and test (rank zero, atomically)."""

    def __init__(self, filename: str = "metrics.json") -> None:
        super().__init__()
        self.filename = filename
        self.metrics: dict[str, float] = {}

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if not trainer.is_global_zero:
            return
        hparams = {k: v for k, v in pl_module.hparams.items() if isinstance(v, str | int | float | bool | None)}
        write_json(Path(trainer.default_root_dir) / self.filename, {
            "method": method_label(hparams.get("gate"), trainer.callbacks), "hparams": hparams,
            "epoch": trainer.current_epoch, "global_step": trainer.global_step, "metrics": self.metrics})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    on_fit_end = on_test_end = on_validation_end


def summary_row(run_id: str, run_dir: Path, point: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """One summary.csv row: the point, then acc / FLOPs ratios (test if the run tested, else val), then all."""
    row: dict[str, Any] = {"run": run_id, "status": record["status"], **point}
    path = run_dir / "metrics.json"
    if record["status"] == "finished" and path.is_file():
        data = json.loads(path.read_text())
        metrics, hp = data["metrics"], data["hparams"]
        stage = "test" if "test/acc" in metrics else "val"
        row.update({"method": data["method"], "gate": hp.get("gate"), "lam": hp.get("lam"),
                    "backbone": hp.get("backbone"), "eval": stage, "acc": metrics.get(f"{stage}/acc"),
                    "flops_mean_ratio": metrics.get(f"{stage}/flops_mean_ratio"),
                    "flops_p90_ratio": metrics.get(f"{stage}/flops_p90_ratio")})
        row.update(sorted(metrics.items()))
    row.update({"returncode": record["returncode"], "wall_s": record["wall_s"], "run_dir": str(run_dir)})
    return row


def _finished(run_dir: Path, point: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished run of exactly this point, if there is one."""
    path = run_dir / "sweep_run.json"
    if not path.is_file() or not (run_dir / "metrics.json").is_file():
        return None
    record = json.loads(path.read_text())
    same = record.get("params") == json.loads(json.dumps(point))
    return record if same and record.get("status") == "finished" else None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the runner dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not exited after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: list[str], run_dir: Path, env: dict[str, str]) -> int:
    """Run ``command`` in its own process group with its output in ``run_dir/run.log``; returns the exit code.
    However this call ends (Ctrl-C, SIGTERM, an error), the group is ended with it."""
    with open(run_dir / "run.log", "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0,
                                preexec_fn=_die_with_parent)
        try:
            return proc.wait()
        finally:
            if proc.returncode is None:
                _end_group(proc)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.sweep.lock`` for this runner, or fail naming the runner that holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".sweep.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RuntimeError(f"sweep folder {folder} is in use by another runner ({holder}); wait for it to "
                               "finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{shlex.join(sys.argv)}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def cli_args(command: Sequence[str]) -> list[str] | None:
    """The arguments a command passes to the dynprune CLI (``python -m dynprune ...``, ``dynprune ...``,
    ``.../dynprune/cli.py ...``), or None if it runs another program."""
    for i, chunk in enumerate(command):
        if chunk == "-m" and i + 1 < len(command) and command[i + 1] == "dynprune":
            return list(command[i + 2 :])
        if Path(chunk).name == "dynprune" or chunk.replace(os.sep, "/").endswith("dynprune/cli.py"):
            return list(command[i + 1 :])
    return None


def check_points(commands: dict[str, list[str]]) -> None:
    """Parse every dynprune command ({run id: command}) with the CLI, running nothing; the first one the parser
    rejects (unknown key, bad value) is a SweepConfigError with the parser's message."""
    from dynprune.cli import main

    for rid, command in commands.items():
        args = cli_args(command)
        if args is None or not args or args[0] not in ("fit", "validate", "test", "predict"):
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([*args, "--print_config"])
                code: int | str | None = 0
            except SystemExit as exit_info:
                code = exit_info.code
        if code not in (0, None):
            message = err.getvalue().strip().splitlines()
            raise SweepConfigError(f"point {rid} is rejected by the dynprune CLI, nothing was launched: "
                                   f"{message[-1] if message else code}")


def run_sweep(sweep: Sweep, root: str | os.PathLike[str] = "runs", count: int | None = None, seed: int = 0,
              dry_run: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Run every point not finished yet, one subprocess each; returns the path of ``summary.csv``."""
    out = Path(root) / sweep.name
    if out.resolve().parent != Path(root).resolve():
        raise SweepConfigError(f"sweep folder {out} is not directly under --root {root}")
    points = sweep.points(count, seed)
    ids = sweep.run_ids(points)
    if dry_run:
        for i, (rid, point) in enumerate(zip(ids, points, strict=True), 1):
            if _finished(out / rid, point) is None:
                echo(f"[{i}/{len(points)}] {rid}: {shlex.join(sweep.command_for(point, out / rid))}")
        return out / "summary.csv"
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.signal(sig, _raise_exit) for sig in STOP_SIGNALS} if main_thread else {}
    try:
        with sweep_lock(out):
            check_points({rid: sweep.command_for(point, out / rid) for rid, point in zip(ids, points, strict=True)
                          if _finished(out / rid, point) is None})
            return _run_points(sweep, out, ids, points, echo)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run_points(sweep: Sweep, out: Path, ids: list[str], points: list[dict[str, Any]],
                echo: Callable[[str], None]) -> Path:
    summary = out / "summary.csv"
    rows, failed = [], []
    for i, (rid, point) in enumerate(zip(ids, points, strict=True), 1):
        run_dir = out / rid
        head = f"[{i}/{len(points)}] {rid}"
        record = _finished(run_dir, point)
        if record is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").unlink(missing_ok=True)
            command = sweep.command_for(point, run_dir)
            env = {**os.environ, "WANDB_NAME": rid, "WANDB_RUN_GROUP": sweep.name, "PYTHONUNBUFFERED": "1"}
            env.setdefault("WANDB_MODE", "offline")
            echo(f"{head}: running, log in {run_dir / 'run.log'}")
            start = time.time()
            rc = run_logged(command, run_dir, env)
            ok = rc == 0 and (run_dir / "metrics.json").is_file()
            record = {"params": point, "command": command, "returncode": rc, "wall_s": round(time.time() - start, 1),
                      "status": "finished" if ok else "failed"}
            write_json(run_dir / "sweep_run.json", record)
        else:
            echo(f"{head}: finished earlier, skipped")
        row = summary_row(rid, run_dir, point, record)
        rows.append(row)
        write_csv(summary, rows)
        if record["status"] == "finished":
            echo(f"{head}: acc {row['acc']}, mean FLOPs ratio {row['flops_mean_ratio']} ({record['wall_s']} s)")
        else:
            failed.append(rid)
            log = run_dir / "run.log"
            tail = log.read_text().splitlines()[-15:] if log.is_file() else []
            echo(f"{head}: FAILED (exit code {record['returncode']}):\n  " + "\n  ".join(tail))
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their run.log "
                           "(run the sweep again to retry them)")
    if rows and sweep.metric:
        name, goal = sweep.metric["name"], sweep.metric["goal"]
        scored = [r for r in rows if isinstance(r.get(name), float)]
        if scored:
            best = (max if goal == "maximize" else min)(scored, key=lambda r: r[name])
            echo(f"best run by {name} ({goal}): {best['run']} ({best[name]:.4f})")
    if rows:
        echo(f"summary: {summary}")
    return summary


def sweep_main(argv: Sequence[str] | None = None) -> None:
    """``dynprune sweep SWEEP.yaml [--count N] [--root runs] [--seed 0] [--dry-run]``."""
    parser = argparse.ArgumentParser(prog="dynprune sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep YAML in wandb's format (configs/sweeps/*.yaml)")
    parser.add_argument("--count", type=int, default=None, help="runs to do (random: required unless run_cap)")
    parser.add_argument("--root", default="runs", help="runs go to ROOT/<sweep name>/<run id>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search's samples")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    try:
        sweep = load_sweep(args.sweep)
        run_sweep(sweep, args.root, args.count, args.seed, args.dry_run)
    except SweepConfigError as err:
        parser.error(str(err))
    except RuntimeError as err:
        print(f"dynprune sweep: {err}", file=sys.stderr)
        raise SystemExit(1) from err
