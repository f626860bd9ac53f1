"""FlopsCallback: per-input effective-FLOPs statistics of a gated model at validation/test end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dynprune.io import run_dir, save_figure, write_csv, write_json


def flops_stats(flops: Tensor, dense: int) -> dict[str, float]:
    """Mean/p50/p90/min/max of per-input FLOPs (N,), absolute and as a ratio of ``dense``."""
    flops = flops.double()
    q = torch.quantile(flops, torch.tensor([0.5, 0.9], dtype=flops.dtype, device=flops.device))
    stats = {"mean": flops.mean(), "p50": q[0], "p90": q[1], "min": flops.min(), "max": flops.max()}
    out = {f"flops_{k}": float(v) for k, v in stats.items()}
    out.update({f"flops_{k}_ratio": float(v) / dense for k, v in stats.items()})
    out["flops_saved"] = 1.0 - out["flops_mean_ratio"]
    return out


def format_report(report: dict[str, Any]) -> str:
    """A plain-text FLOPs report (FLOPs = 2 x MACs, per input)."""
    s = report["summary"]
    lines = [
        f"FLOPs report ({report['stage']}, {report['inputs']} inputs; FLOPs = 2 x MACs, per input)",
        f"  dense backbone : {report['dense_flops'] / 1e6:10.3f} MFLOPs",
        f"  gates          : {report['gate_flops'] / 1e6:10.3f} MFLOPs (not in the ratios below)",
        f"  effective mean : {s['flops_mean'] / 1e6:10.3f} MFLOPs  ({s['flops_mean_ratio']:.1%} of dense,"
        f" {s['flops_saved']:.1%} saved)",
        f"  p50 / p90      : {s['flops_p50'] / 1e6:.3f} / {s['flops_p90'] / 1e6:.3f} MFLOPs",
        f"  min / max      : {s['flops_min'] / 1e6:.3f} / {s['flops_max'] / 1e6:.3f} MFLOPs",
    ]
    if report["layers"]:
        lines.append(f"  {'layer':<28}{'keep':>8}{'dense MFLOPs':>14}{'eff. MFLOPs':>13}")
        for row in report["layers"]:
            keep = "-" if row["keep"] is None else f"{row['keep']:.3f}"
            lines.append(f"  {row['layer']:<28}{keep:>8}{row['dense_flops'] / 1e6:>14.3f}"
                         f"{row['effective_flops'] / 1e6:>13.3f}")
    return "\n".join(lines)


class FlopsCallback(L.Callback):
    """Gathers per-input effective FLOPs and per-layer keep rates over a validation/test epoch
    (across DDP ranks), logs summary statistics and writes ``flops.json``, ``flops_layers.csv``
    and ``flops_hist_<stage>.png`` to ``dirpath`` (default: the run's folder, next to ``checkpoints/``).

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
        self._keep: dict[str, list[Tensor]] = {}
        self._layer: dict[str, list[Tensor]] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def _reset(self) -> None:
        self._flops, self._keep, self._layer = [], {}, {}

    def _collect(self, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "flops" not in outputs:
            raise TypeError("FlopsCallback needs a module whose eval steps return "
                            "{'flops', 'keep', 'layer_flops'} (e.g. dynprune.GatedClassifier)")
        self._flops.append(outputs["flops"])
        for store, key in ((self._keep, "keep"), (self._layer, "layer_flops")):
            for name, value in outputs[key].items():
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
        return pl_module.all_gather(local).reshape(-1) if pl_module.trainer.world_size > 1 else local

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._flops:
            return
        profile = pl_module.profile
        flops = self._gather(pl_module, self._flops)
        keep = {n: self._gather(pl_module, v).mean().item() for n, v in self._keep.items()}
        layer_eff = {n: self._gather(pl_module, v).mean().item() for n, v in self._layer.items()}
        summary = flops_stats(flops, profile.dense_total)
        layers = [{"layer": lay.name, "gated": lay.gated, "keep": keep.get(lay.name),
                   "dense_flops": lay.dense, "effective_flops": layer_eff.get(lay.name, lay.dense)}
                  for lay in profile.layers]
        report = {"stage": stage, "inputs": int(flops.numel()), "dense_flops": profile.dense_total,
                  "gate_flops": profile.gate_flops, "summary": summary, "layers": layers,
                  "epoch": trainer.current_epoch}
        self.reports[stage] = report
        metrics = {f"{stage}/{k}": v for k, v in summary.items()}
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
        path = out / "flops.json"
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged[stage] = report
        write_json(path, merged)
        rows = [{"stage": s, **row} for s, rep in merged.items() for row in rep["layers"]]
        write_csv(out / "flops_layers.csv", rows)
        if self.plot:
            self._histogram(out / f"flops_hist_{stage}.png", flops / report["dense_flops"], stage)

    @staticmethod
    def _histogram(path: Path, ratios: Tensor, stage: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(ratios.cpu().numpy(), bins=40, color="tab:blue")
        ax.axvline(float(ratios.mean()), color="tab:red", ls="--", label=f"mean {float(ratios.mean()):.3f}")
        ax.set_xlabel("effective FLOPs / dense FLOPs (per input)")
        ax.set_ylabel("inputs")
        ax.set_title(f"Per-input FLOPs ({stage})")
        ax.legend()
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
