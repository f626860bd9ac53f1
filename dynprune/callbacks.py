"""FlopsCallback: per-input effective-FLOPs statistics of a gated model at validation/test end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from dynprune.dependence import format_dependence, input_dependence, plot_class_flops
from dynprune.granularity import report_sections
from dynprune.io import run_dir, save_figure, write_csv, write_json

TARGET_TOLERANCE = 0.05
HIST_BINS = 50  # bins of 0.02 of dense over the fixed range [0, 1]
NEAR_STATIC_DYNAMIC_FRAC = 0.05  # below this fraction of dynamic units, masks are nearly one per model


def flops_stats(flops: Tensor, dense: int) -> dict[str, float]:
    """Mean/p10/p50/p90/min/max of per-input FLOPs (N,), absolute and as a ratio of ``dense``."""
    flops = flops.double()
    q = torch.quantile(flops, torch.tensor([0.1, 0.5, 0.9], dtype=flops.dtype, device=flops.device))
    stats = {"mean": flops.mean(), "p10": q[0], "p50": q[1], "p90": q[2], "min": flops.min(), "max": flops.max()}
    out = {f"flops_{k}": float(v) for k, v in stats.items()}
    out.update({f"flops_{k}_ratio": float(v) / dense for k, v in stats.items()})
    out["flops_saved"] = 1.0 - out["flops_mean_ratio"]
    out["flops_p90_p10"] = out["flops_p90"] / out["flops_p10"] if out["flops_p10"] > 0 else float("inf")
    return out


def format_report(report: dict[str, Any]) -> str:
    """A plain-text FLOPs report (FLOPs = 2 x MACs, per input)."""
    s = report["summary"]
    lines = [
        f"FLOPs report ({report['stage']}, {report['inputs']} inputs; FLOPs = 2 x MACs, per input)",
        f"  dense backbone : {report['dense_flops'] / 1e6:10.3f} MFLOPs",
        f"  gates          : {report['gate_flops'] / 1e6:10.3f} MFLOPs (mean per input; not in the ratios below)",
        f"  effective mean : {s['flops_mean'] / 1e6:10.3f} MFLOPs  ({s['flops_mean_ratio']:.1%} of dense,"
        f" {s['flops_saved']:.1%} saved)",
        f"  p10 / p50 / p90: {s['flops_p10'] / 1e6:.3f} / {s['flops_p50'] / 1e6:.3f} / {s['flops_p90'] / 1e6:.3f}"
        f" MFLOPs (p90/p10 {s['flops_p90_p10']:.2f})",
        f"  min / max      : {s['flops_min'] / 1e6:.3f} / {s['flops_max'] / 1e6:.3f} MFLOPs",
    ]
    if report.get("target_missed"):
        lines.append(f"  WARNING: mean FLOPs {s['flops_mean_ratio']:.3f} of dense missed the target {report['target']}"
                     f" by more than {TARGET_TOLERANCE}")
    if report["layers"]:
        lines.append(f"  {'layer':<28}{'keep':>8}{'dense MFLOPs':>14}{'eff. MFLOPs':>13}")
        for row in report["layers"]:
            keep = "-" if row["keep"] is None else f"{row['keep']:.3f}"
            lines.append(f"  {row['layer']:<28}{keep:>8}{row['dense_flops'] / 1e6:>14.3f}"
                         f"{row['effective_flops'] / 1e6:>13.3f}")
    if report.get("dependence"):
        lines.append(format_dependence(report["dependence"]))
        lines += static_verdict(report["dependence"])
    for title, rows in (report.get("sections") or {}).items():
        for site, shares in rows.items():
            cells = "  ".join(f"{label}: {share:.1%}" for label, share in shares.items())
            lines.append(f"  {title} at {site}: {cells}")
    return "\n".join(lines)


def static_verdict(dependence: dict[str, Any]) -> list[str]:
    """Report lines, in words, for masks that are (nearly) the same for every input: when most gated sites apply
    one mask to every input or fewer than ``NEAR_STATIC_DYNAMIC_FRAC`` of the units are dynamic, the model is
    (nearly) static pruning; say so and name the options that give input dependence. [] otherwise."""
    sites = dependence["sites"]
    static = sum(s["unique_masks"] == 1 for s in sites)
    dynamic = dependence["dynamic_frac"]
    if not sites or (2 * static <= len(sites) and dynamic >= NEAR_STATIC_DYNAMIC_FRAC):
        return []
    kind = "static" if static == len(sites) else "nearly static"
    return [f"  This model is {kind} pruning, not input-dependent computation: {static} of {len(sites)} gated sites "
            f"apply one mask to every input and {dynamic:.1%} of the units are dynamic.",
            "  For masks that depend on the input, train with batch shaping (--model.batch_shaping 3.0 "
            "--model.batch_shaping_warmup 0.8) or a logit penalty (--model.logit_penalty 0.1); "
            "docs/concepts/flops.md compares both."]


class FlopsCallback(L.Callback):
    """Gathers per-input effective FLOPs, per-site decisions and labels over a validation/test epoch
    (across DDP ranks); logs summary and input-dependence statistics (p10/p90 FLOPs, dynamic units,
    unique masks, per-class FLOPs), warns when a FLOPs target is missed by more than 0.05, and writes
    ``flops.json``, ``flops_layers.csv``, ``flops_hist_<stage>.png`` and ``flops_class_<stage>.png`` to
    ``dirpath`` (default: the run's folder, next to ``checkpoints/``). ``flops.json`` holds the reports of the
    stages this callback measured ({stage: report}), written fresh each time: a file already there, from another
    run or another program, is replaced (a symlink itself, never its target), not read.

    Args:
        dirpath: where to write; None uses the run's folder (:func:`dynprune.io.run_dir`).
        log_layers: also log each layer's keep rate as ``<stage>/keep/<layer>``.
        plot: write the histogram PNG.
        verbose: print the report at test end.
    """

    def __init__(self, dirpath: str | None = None, log_layers: bool = True, plot: bool = True,
                 verbose: bool = True) -> None:
        super().__init__()
        self.dirpath, self.log_layers, self.plot, self.verbose = dirpath, log_layers, plot, verbose
        self._flops: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._keep: dict[str, list[Tensor]] = {}
        self._layer: dict[str, list[Tensor]] = {}
        self._masks: dict[str, list[Tensor]] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def _reset(self) -> None:
        self._flops, self._labels, self._keep, self._layer, self._masks = [], [], {}, {}, {}

    def _collect(self, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "flops" not in outputs:
            raise TypeError("FlopsCallback needs a module whose eval steps return "
                            "{'flops', 'keep', 'layer_flops'} (e.g. dynprune.GatedClassifier)")
        self._flops.append(outputs["flops"])
        if "labels" in outputs:
            self._labels.append(outputs["labels"])
        for store, key in ((self._keep, "keep"), (self._layer, "layer_flops"), (self._masks, "masks")):
            for name, value in outputs.get(key, {}).items():
                store.setdefault(name, []).append(value)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    @staticmethod
    def _gather(pl_module: L.LightningModule, parts: list[Tensor]) -> Tensor:
        """Concatenate this rank's per-input values and gather them from every rank."""
        local = torch.cat(parts)
        if pl_module.trainer.world_size == 1:
            return local
        return pl_module.all_gather(local).reshape(-1, *local.shape[1:])

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._flops:
            return
        profile = pl_module.profile
        flops = self._gather(pl_module, self._flops)
        keep = {n: self._gather(pl_module, v).mean().item() for n, v in self._keep.items()}
        layer_eff = {n: self._gather(pl_module, v).mean().item() for n, v in self._layer.items()}
        summary = flops_stats(flops, profile.dense_total)
        masks = {n: self._gather(pl_module, [m.to(torch.uint8) for m in v]).bool() for n, v in self._masks.items()}
        labels = self._gather(pl_module, self._labels) if self._labels else None
        hparams = getattr(pl_module, "hparams", {})
        dependence = input_dependence(masks, flops, labels, profile.dense_total,
                                      hparams.get("num_classes")) if masks else None
        target = hparams.get("target") if masks else None
        info = getattr(getattr(pl_module, "model", None), "dynprune", None)
        sections = report_sections(info.sites, masks) if info is not None else {}  # each granularity's own
        gates = profile.gates({n: m.float() for n, m in masks.items()}).mean().item() if masks else profile.gate_flops
        missed = target is not None and abs(summary["flops_mean_ratio"] - target) > TARGET_TOLERANCE
        layers = [{"layer": lay.name, "gated": lay.gated, "keep": keep.get(lay.name),
                   "dense_flops": lay.dense, "effective_flops": layer_eff.get(lay.name, lay.dense)}
                  for lay in profile.layers]
        report = {"stage": stage, "inputs": int(flops.numel()), "dense_flops": profile.dense_total,
                  "gate_flops": gates, "summary": summary, "layers": layers,
                  "epoch": trainer.current_epoch, "target": target, "target_missed": missed,
                  "dependence": dependence, "sections": sections}
        self.reports[stage] = report
        metrics = {f"{stage}/{k}": v for k, v in summary.items()}
        if dependence is not None:
            metrics[f"{stage}/dynamic_frac"] = dependence["dynamic_frac"]
            if dependence["class_spread"] is not None:
                metrics[f"{stage}/class_flops_spread"] = dependence["class_spread"]
        if missed:
            rank_zero_warn(f"{stage}: mean FLOPs {summary['flops_mean_ratio']:.3f} of dense missed the target "
                           f"{target} by more than {TARGET_TOLERANCE}")
        if self.log_layers:
            metrics.update({f"{stage}/keep/{n}": v for n, v in keep.items()})
        pl_module.log_dict(metrics, sync_dist=False, rank_zero_only=True)
        if trainer.is_global_zero:
            self._write(trainer, stage, report, flops)
            if stage == "test" and self.verbose:
                rank_zero_info(format_report(report))

    def output_dir(self, trainer: L.Trainer) -> Path:
        """Folder of the outputs: ``dirpath``, else the run's own folder (:func:`dynprune.io.run_dir`)."""
        return Path(self.dirpath) if self.dirpath else run_dir(trainer)

    def _write(self, trainer: L.Trainer, stage: str, report: dict[str, Any], flops: Tensor) -> None:
        out = self.output_dir(trainer)
        write_json(out / "flops.json", self.reports)  # fresh: a file already there (even a symlink) is replaced
        rows = [{"stage": s, **row} for s, rep in self.reports.items() for row in rep["layers"]]
        write_csv(out / "flops_layers.csv", rows)
        if self.plot:
            self._histogram(out / f"flops_hist_{stage}.png", flops / report["dense_flops"], stage)
            if report["dependence"] and report["dependence"]["classes"]:
                plot_class_flops(report["dependence"], out / f"flops_class_{stage}.png")

    @staticmethod
    def _histogram(path: Path, ratios: Tensor, stage: str) -> None:
        """Histogram of per-input FLOPs ratios (N,) on the fixed range [0, 1] of dense, so that a spread of a
        few thousandths shows as the one bar it is, with p10/p90 marked and p90/p10 in the title."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = ratios.double().cpu()
        p10, p90 = (float(q) for q in torch.quantile(values, torch.tensor([0.1, 0.9], dtype=values.dtype)))
        spread = f"{p90 / p10:.2f}" if p10 > 0 else "inf"
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(values.numpy(), bins=HIST_BINS, range=(0.0, 1.0), color="tab:blue")
        ax.axvline(float(values.mean()), color="tab:red", ls="--", label=f"mean {float(values.mean()):.3f}")
        for q, value, style in (("p10", p10, ":"), ("p90", p90, "-.")):
            ax.axvline(value, color="black", ls=style, lw=1, label=f"{q} {value:.3f}")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("effective FLOPs / dense FLOPs (per input)")
        ax.set_ylabel("inputs")
        ax.set_title(f"Per-input FLOPs ({stage}): p90/p10 = {spread}")
        ax.legend(fontsize="small")
        save_figure(fig, path)
        plt.close(fig)


class EpochTimer(L.Callback):
    """Logs the wall time of each epoch's training batches (``train/epoch_time_s``, validation
    excluded) and keeps them in ``times``, so gated-vs-dense cost can be compared as a ratio."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(self._last - self._start)
        pl_module.log("train/epoch_time_s", self.times[-1], on_epoch=True)


class GatedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose monitored best (``best.ckpt``) counts only epochs with the gates on: an epoch of
    a module's dense warm-up (``in_dense_phase()``, see ``GatedClassifier(dense_epochs=...)``) is not a result
    of the gated model, however good its accuracy.

    With ``save_last``, ``last.ckpt`` is written at every save point (the end of every epoch by default), dense
    epochs and epochs that do not improve the best included, so ``--ckpt_path last`` resumes from the newest
    state; Lightning's ModelCheckpoint writes it only when a top-k checkpoint was written at the same step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        in_dense = getattr(trainer.lightning_module, "in_dense_phase", None)
        if in_dense is None or not in_dense():
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        """Write ``last.ckpt`` once per global step (ModelCheckpoint asks again after a top-k save)."""
        if self._last_written_step == trainer.global_step:
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step
