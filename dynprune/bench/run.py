"""Run one benchmark point: build the arm's model from the protocol, train it, validate, test once.

Every run goes through the same Lightning loop (SGD nesterov, per-epoch cosine), data split and seed;
only the method differs. The dense model of a seed is trained once, saved as ``<root>/dense_s<seed>/
dense.ckpt`` (under a file lock, so concurrent points share it) and reused as every arm's warm start and,
for the ``+kd`` variants, as the frozen teacher. A point's result is ``<root>/<point>/result.json``, written
last and atomically with the hash of the point's spec: a finished point is never rerun; a point whose
FLOPs miss 1/R leaves ``rejected.json`` instead and raises :class:`FairnessError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from dynprune import backbones
from dynprune.bench.config import SCALES, BenchConfig, FairnessError, Point
from dynprune.callbacks import FlopsCallback
from dynprune.data import DigitsDataModule, FashionMNISTDataModule
from dynprune.flops import count_flops
from dynprune.io import write_json
from dynprune.module import GatedClassifier
from dynprune.task import QUIET

RESULT = "result.json"
REJECTED = "rejected.json"
DENSE_CKPT = "dense.ckpt"
MODEL = "model.pt"  # the trained network of a point (pickled nn.Module, gates included): what latency times


def device_name(accelerator: str) -> str:
    """The machine a number came from: GPU name, or CPU model, with the torch thread count."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} thread(s) (torch {torch.__version__})"


def code_version() -> str:
    """The git commit of the code that ran (``+dirty`` with uncommitted changes to the package; a result file the
    runner itself rewrote does not count), or ``unknown``."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".."], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def datamodule(cfg: BenchConfig, seed: int) -> L.LightningDataModule:
    """The protocol's data for ``seed`` (the validation split and the shuffling depend on it)."""
    d = cfg.data
    if d.dataset == "digits":
        return DigitsDataModule(batch_size=d.batch_size, input_size=d.input_size, seed=seed)
    return FashionMNISTDataModule(d.data_dir, batch_size=d.batch_size, val_size=d.val_size,
                                  train_subset=d.train_subset, test_subset=d.test_subset, seed=seed)


def shape_kwargs(cfg: BenchConfig) -> dict[str, int]:
    """num_classes / in_chans / input_size of the protocol's data."""
    return {"num_classes": 10, "in_chans": 1, "input_size": cfg.data.input_size}


def input_shape(cfg: BenchConfig) -> tuple[int, int, int]:
    """(C, H, W) of one input."""
    return (1, cfg.data.input_size, cfg.data.input_size)


def dense_flops(cfg: BenchConfig, width_mult: float = 1.0, depth_mult: float = 1.0) -> int:
    """FlopCounterMode FLOPs of the backbone at ``width_mult`` and ``depth_mult`` on one input."""
    return _flops_at(cfg.backbone, cfg.data.input_size, width_mult, depth_mult)


@functools.cache
def _flops_at(backbone: str, input_size: int, width_mult: float, depth_mult: float = 1.0) -> int:
    model = backbones.create(backbone, num_classes=10, in_chans=1, input_size=input_size, width_mult=width_mult,
                             depth_mult=depth_mult)
    return count_flops(model, (1, input_size, input_size))[0]


def search_scale(cfg: BenchConfig, ratio: float, scale: str = "width") -> tuple[float, float]:
    """The multiplier of the backbone's ``scale`` (``width``: width_mult, ``depth``: depth_mult) whose network has
    FLOPs closest to 1/``ratio`` of the dense one: (multiplier, achieved FLOPs ratio). FLOPs grow monotonically
    with either, so a bisection finds the two multipliers around the target and the closer one wins; they map
    to integer channel or block counts, so a target between two is missed by up to one step (checked against
    the tolerance by the caller)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")

    def flops(mult: float) -> float:
        return dense_flops(cfg, **{SCALES[scale]: mult}) / full

    full, target = dense_flops(cfg), 1.0 / ratio
    lo, hi = 1e-3, 1.0
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops(mid) < target else (lo, mid)
    return min(((m, flops(m)) for m in (lo, hi)), key=lambda c: abs(c[1] / target - 1))


def search_width(cfg: BenchConfig, ratio: float) -> tuple[float, float]:
    """:func:`search_scale` over the width: (width_mult, achieved FLOPs ratio)."""
    return search_scale(cfg, ratio, "width")


def check_flops(point: Point, achieved: float, tolerance: float, where: str) -> None:
    """FairnessError unless ``achieved`` (a FLOPs ratio) lies within ``tolerance`` (relative) of 1/R."""
    target = 1.0 / point.ratio
    if abs(achieved / target - 1) > tolerance:
        raise FairnessError(f"{point.id}: {where} FLOPs ratio {achieved:.5f} is {100 * (achieved / target - 1):+.2f}% "
                            f"off the target 1/{point.ratio:g} = {target:.5f} (allowed: +-{100 * tolerance:g}% "
                            "relative)")


def _trainer(cfg: BenchConfig, epochs: int) -> L.Trainer:
    """The one loop every run uses; validation and test are separate calls (see :func:`fit_and_evaluate`)."""
    return _quiet(cfg, max_epochs=epochs, limit_val_batches=0)


def _quiet(cfg: BenchConfig, **kwargs: Any) -> L.Trainer:
    """A trainer with no logger, checkpoints or progress output on the config's accelerator (one device), clipping
    gradients where the config says."""
    return L.Trainer(**QUIET, accelerator=cfg.accelerator, devices=1, gradient_clip_val=cfg.gradient_clip, **kwargs)


def task_kwargs(cfg: BenchConfig) -> dict[str, Any]:
    """The input/output shape and optimiser arguments every model of the protocol is built with."""
    return {**shape_kwargs(cfg), "optimizer": cfg.optimizer, "weight_decay": cfg.weight_decay}


def _flops_row(report: dict[str, Any], full: int) -> dict[str, Any]:
    """FLOPs ratios of one FlopsCallback report, against the full dense model's ``full`` FLOPs (a thinned
    model's own dense count is smaller), the gates' own FLOPs included (not in ``flops_ratio_no_gates``)."""
    s, dep = report["summary"], report.get("dependence") or {}
    gates = report.get("gate_flops", 0) or 0
    return {"flops_ratio": (s["flops_mean"] + gates) / full, "flops_ratio_no_gates": s["flops_mean"] / full,
            "gate_flops_ratio": gates / full, "flops_p10": (s["flops_p10"] + gates) / full,
            "flops_p90": (s["flops_p90"] + gates) / full,
            "dynamic_frac": dep.get("dynamic_frac", 0.0), "class_spread": dep.get("class_spread") or 1.0,
            "class_flops": {str(c["class"]): c["flops_ratio"] for c in dep.get("classes", [])}}


def fit_and_evaluate(cfg: BenchConfig, module: L.LightningModule, dm: L.LightningDataModule, epochs: int,
                     out: Path, full: int) -> dict[str, Any]:
    """Train for ``epochs`` (no checkpoint selection: the last epoch is the model), then one validation
    pass and one test pass: {"val": {...}, "test": {...}} with accuracy and FLOPs statistics."""
    start = time.time()
    if epochs:
        _trainer(cfg, epochs).fit(module, dm)
    fit_s = time.time() - start
    cb = FlopsCallback(dirpath=str(out), plot=False, verbose=False, log_layers=False)
    evaluator = _quiet(cfg, callbacks=[cb])
    val = evaluator.validate(module, dm, verbose=False)[0]
    test = evaluator.test(module, dm, verbose=False)[0]
    return {"val": {"acc": 100 * val["val/acc"], **_flops_row(cb.reports["val"], full)},
            "test": {"acc": 100 * test["test/acc"], **_flops_row(cb.reports["test"], full)},
            "fit_seconds": round(fit_s, 1)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (blocking): one process trains a dense model, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finished(cfg: BenchConfig, point: Point, root: Path) -> dict[str, Any] | None:
    """The stored result of ``point`` if it ran with the same spec, else None."""
    path = root / point.id / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("digest") == cfg.digest(point) else None


def rejected(cfg: BenchConfig, point: Point, root: Path) -> dict[str, Any] | None:
    """The stored rejection of ``point`` (its FLOPs missed 1/R) if it ran with the same spec, else None: training
    is seeded, so running it again would land in the same place."""
    path = root / point.id / REJECTED
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("digest") == cfg.digest(point) else None


def point_state(cfg: BenchConfig, point: Point, root: Path) -> str:
    """``finished``, ``rejected`` (with this spec: not run again) or ``to run``."""
    if finished(cfg, point, root) is not None:
        return "finished"
    return "rejected" if rejected(cfg, point, root) is not None else "to run"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the identity of a teacher)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def dense_checkpoint(cfg: BenchConfig, seed: int, root: Path) -> Path:
    """The dense checkpoint of ``seed``, training it first (once, under a lock) if it is missing."""
    point = Point("dense", "dense", seed)
    with _locked(root / f".{point.id}.lock"):
        if finished(cfg, point, root) is None:
            _record(cfg, point, root, _train_dense(cfg, point, root))
    return root / point.id / DENSE_CKPT


def _train_dense(cfg: BenchConfig, point: Point, root: Path, epochs: int | None = None) -> dict[str, Any]:
    """Train the dense model of ``point.seed`` from an initialisation of that seed (its variance is counted) for
    ``epochs`` (the protocol's dense epochs unless given: a dense reference trains longer)."""
    epochs = cfg.dense_epochs if epochs is None else epochs
    out = root / point.id
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(point.seed, verbose=False)
    dm = datamodule(cfg, point.seed)
    module = GatedClassifier(cfg.backbone, gate=None, lr=cfg.lr, **task_kwargs(cfg))
    trainer = _trainer(cfg, epochs)
    start = time.time()
    trainer.fit(module, dm)
    tmp = out / f".{DENSE_CKPT}.{os.getpid()}.tmp"
    trainer.save_checkpoint(tmp)
    os.replace(tmp, out / DENSE_CKPT)
    evaluated = fit_and_evaluate(cfg, module, dm, 0, out, dense_flops(cfg))
    evaluated["fit_seconds"] = round(time.time() - start, 1)
    return {**evaluated, "epochs": epochs, "total_epochs": epochs,
            "checkpoint_digest": file_digest(out / DENSE_CKPT)}


def _teacher_kwargs(cfg: BenchConfig, point: Point, dense: Path) -> dict[str, Any]:
    """The shared teacher of a ``+kd`` point: the frozen dense model of its seed (none without kd)."""
    if not point.kd:
        return {}
    return {"teacher": str(dense), "distill": cfg.kd_weight, "distill_temperature": cfg.kd_temperature}


def _static_model(cfg: BenchConfig, point: Point, dense: Path,
                  dm: L.LightningDataModule) -> tuple[nn.Module, dict[str, Any]]:
    """The dense model of the seed pruned by the arm's criterion to 1/R of its FLOPs (Torch-Pruning's channel
    groups, physically removed; ``prune_to_flops``); a data-driven criterion scores one training batch."""
    from dynprune.static import prune_to_flops

    criterion = cfg.arm(point.arm).criterion
    module = GatedClassifier(cfg.backbone, gate=None, init_from=str(dense), **shape_kwargs(cfg))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    try:
        small = prune_to_flops(module.model.cpu(), point.ratio, criterion, input_shape(cfg), batch=batch,
                               tol=cfg.flops_tolerance)
    except ValueError as err:  # 1/R out of reach within the tolerance
        raise FairnessError(f"{point.id}: {err}") from err
    report = small.pruning_report
    return small, {"criterion": criterion, "flops_ratio": report["flops_ratio"],
                   "fractions": {k: round(v, 4) for k, v in report["fractions"].items()}}


def _reduced_model(cfg: BenchConfig, point: Point, dense: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The dense ViT of the seed with the arm's token reduction (ToMe or EViT, :mod:`dynprune.baselines`) at the
    schedule whose FlopCounterMode FLOPs are nearest 1/R; the reduction's weights are the dense model's."""
    from dynprune.baselines import apply_evit, apply_tome, pick_evit_keep_rate, pick_tome_schedule

    method = cfg.arm(point.arm).method
    vit = GatedClassifier(cfg.backbone, gate=None, init_from=str(dense), **shape_kwargs(cfg)).model
    pick, apply, key = {"tome": (pick_tome_schedule, apply_tome, "r"),
                        "evit": (pick_evit_keep_rate, apply_evit, "keep_rate")}[method]
    try:
        chosen, reduction = pick(vit, point.ratio, tol=cfg.flops_tolerance)
    except ValueError as err:  # 1/R out of reach within the tolerance
        raise FairnessError(f"{point.id}: {err}") from err
    return apply(vit, chosen), {"method": method, key: chosen, "flops_ratio": 1.0 / reduction}


def build(cfg: BenchConfig, point: Point, dense: Path,
          dm: L.LightningDataModule) -> tuple[L.LightningModule, dict[str, Any]]:
    """The arm's LightningModule for ``point`` and what the harness chose for it (width, depth, fraction,
    token schedule)."""
    arm = cfg.arm(point.arm)
    task, teacher = task_kwargs(cfg), _teacher_kwargs(cfg, point, dense)
    if arm.kind in ("static", "reduce"):
        small, info = (_static_model(cfg, point, dense, dm) if arm.kind == "static" else
                       _reduced_model(cfg, point, dense))
        return GatedClassifier(small, gate=None, lr=cfg.finetune_lr, **task, **teacher), info
    if arm.kind == "thin":
        mult, _ = search_scale(cfg, point.ratio, arm.scale)
        chosen = {SCALES[arm.scale]: mult}
        return GatedClassifier(cfg.backbone, gate=None, lr=cfg.lr, **chosen, **task, **teacher), chosen
    if arm.kind == "dynamic":
        warm = {"init_from": str(dense), "lr": cfg.finetune_lr} if arm.start == "warm" else {"lr": cfg.lr}
        return GatedClassifier(cfg.backbone, target=1.0 / point.ratio, **arm.model, **warm, **task, **teacher), {}
    from dynprune.slimmable import SlimmableClassifier

    widths = sorted({search_width(cfg, r)[0] for r in cfg.supernet_ratios()} | {1.0})
    return SlimmableClassifier(cfg.backbone, widths=widths, lr=cfg.lr, **arm.model, **task), {"widths": widths}


def _slimmable_rows(cfg: BenchConfig, module: L.LightningModule, dm: L.LightningDataModule) -> dict[str, Any]:
    """Validate and test a slimmable supernet once; per R, the accuracy of its width matched to 1/R."""
    start = time.time()
    _trainer(cfg, cfg.total_epochs).fit(module, dm)
    evaluator = _quiet(cfg)
    val = evaluator.validate(module, dm, verbose=False)[0]
    test = evaluator.test(module, dm, verbose=False)[0]
    full = dense_flops(cfg)
    per_ratio = {}
    for r in cfg.supernet_ratios():  # every width the supernet trained, so adding an R to the config needs no rerun
        width, _ = search_width(cfg, r)
        ratio = module.flops[width] / full
        row = {"flops_ratio": ratio, "flops_ratio_no_gates": ratio, "gate_flops_ratio": 0.0, "flops_p10": ratio,
               "flops_p90": ratio, "dynamic_frac": 0.0, "class_spread": 1.0, "width_mult": width}
        per_ratio[f"{r:g}"] = {"val": {"acc": 100 * val[f"val/acc_w{width:g}"], **row},
                               "test": {"acc": 100 * test[f"test/acc_w{width:g}"], **row}}
    return {"per_ratio": per_ratio, "fit_seconds": round(time.time() - start, 1)}


def _record(cfg: BenchConfig, point: Point, root: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result.json`` of ``point`` (atomically, last: its presence means finished)."""
    record = {"point": point.id, "method": point.method, "arm": point.arm, "kind": point.kind, "seed": point.seed,
              "ratio": point.ratio, "kd": point.kd, "digest": cfg.digest(point), "spec": cfg.spec(point),
              "device": device_name(cfg.accelerator), "threads": torch.get_num_threads(), "code": code_version(),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    write_json(root / point.id / RESULT, record)
    return record


def save_model(model: nn.Module, path: Path) -> None:
    """Pickle a trained network (on the CPU, gates included) atomically, for :mod:`dynprune.bench.latency`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(model.cpu(), tmp)
    os.replace(tmp, path)


def run_point(cfg: BenchConfig, point: Point, root: str | os.PathLike[str]) -> dict[str, Any]:
    """Run ``point`` unless it already finished with this spec; returns its result record."""
    root = Path(root)
    torch.set_num_threads(cfg.threads)
    done = finished(cfg, point, root)
    if done is not None:
        return done
    refused = rejected(cfg, point, root)
    if refused is not None:
        raise FairnessError(f"{refused['reason']} (rejected earlier with this spec; delete "
                            f"{root / point.id / REJECTED} to run it again)")
    if point.kind == "dense":
        dense_checkpoint(cfg, point.seed, root)
        return finished(cfg, point, root)
    if point.kind == "reference":  # a dense model trained longer, from scratch: nothing starts from it
        return _record(cfg, point, root, _train_dense(cfg, point, root, cfg.reference_epochs(point)))
    dense = dense_checkpoint(cfg, point.seed, root)
    out = root / point.id
    out.mkdir(parents=True, exist_ok=True)
    (out / REJECTED).unlink(missing_ok=True)
    L.seed_everything(point.seed, verbose=False)
    dm, arm, full = datamodule(cfg, point.seed), cfg.arm(point.arm), dense_flops(cfg)
    teacher = {"teacher": f"dense_s{point.seed}", "teacher_digest": file_digest(dense)} if point.kd else {}
    chosen: dict[str, Any] = {}
    try:
        module, chosen = build(cfg, point, dense, dm)
        common = {"epochs": cfg.own_epochs(arm), "warm_start": arm.start == "warm", "total_epochs": cfg.budget(arm),
                  "chosen": chosen, **teacher}
        if point.kind == "slimmable":
            return _record(cfg, point, root, {**_slimmable_rows(cfg, module, dm), **common})
        if point.kind in ("static", "thin", "reduce"):  # the architecture fixes the FLOPs: check before training
            check_flops(point, count_flops(module.model, input_shape(cfg))[0] / full, cfg.flops_tolerance,
                        "architecture")
        result = fit_and_evaluate(cfg, module, dm, cfg.own_epochs(arm), out, full)
        shift = getattr(module, "budget_shift", None)  # target_calibrate: chosen on validation after fit
        if shift is not None:
            chosen["budget_shift"] = {"shift": shift.shift, "val_flops_before": shift.before,
                                      "val_flops_after": shift.after}
        check_flops(point, result["val"]["flops_ratio"], cfg.flops_tolerance, "validation mean")
        save_model(module.model, out / MODEL)
    except FairnessError as err:
        write_json(out / REJECTED, {"point": point.id, "reason": str(err), "chosen": chosen,
                                    "digest": cfg.digest(point)})
        raise
    return _record(cfg, point, root, {**result, **common})
