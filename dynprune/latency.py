"""Measured latency after training: the compiled gated model against its BN-folded dense twin at batch 1.

FLOPs saved are a claim; time saved is a measurement. :class:`LatencyReport` runs after ``test``: it compiles the
trained model (``compile_for_inference``: only the kept compute runs, or the masked path where that measured
faster on these images at batch 1, in the faster memory layout: :mod:`dynprune.runtime.dispatch`), builds the same
backbone without gates (BN folded and in its own faster layout, the fair dense baseline), times both with
``torch.utils.benchmark`` on real test images, one at a time, in interleaved rounds, and prints the measured
speedup beside the theoretical one (dense FLOPs / the effective FLOPs of those images plus the gates' own). It
writes ``latency.json`` next to the FLOPs report.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils import benchmark

from dynprune import backbones
from dynprune.inject import collect_masks
from dynprune.io import write_json
from dynprune.runtime import compile_for_inference


def dense_twin(module: L.LightningModule) -> nn.Module:
    """The module's registered backbone built again without gates, with the trained weights (gate weights left out)."""
    hp = module.hparams
    dense = backbones.create(hp.backbone, hp.num_classes, hp.in_chans, hp.input_size, hp.width_mult, hp.depth_mult)
    missing, _ = dense.load_state_dict(module.model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the gated model lacks backbone weights {missing[:5]}: cannot build its dense twin")
    return dense.eval()


def median_seconds(model: nn.Module, images: Tensor, threads: int, min_run_time: float) -> float:
    """Median seconds per image of ``model`` on ``images`` (N, ...), called one image at a time."""
    timer = benchmark.Timer("for x in xs: model(x)", globals={"model": model, "xs": list(images.split(1))},
                            num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median / len(images)


class LatencyReport(L.Callback):
    """After ``test``: measured batch-1 speedup of the compiled gated model over its BN-folded dense twin.

    Args:
        images: test images timed (the first of the test set, one call each).
        rounds: interleaved rounds of (dense, compiled); the median of each is reported.
        threads: torch threads while timing.
        min_run_time: seconds per timed block.
    """

    def __init__(self, images: int = 32, rounds: int = 3, threads: int = 1, min_run_time: float = 0.5) -> None:
        super().__init__()
        for name, value in (("images", images), ("rounds", rounds), ("threads", threads)):
            if value < 1:
                raise ValueError(f"LatencyReport {name} must be >= 1, got {value}")
        if min_run_time <= 0:
            raise ValueError(f"LatencyReport min_run_time must be > 0, got {min_run_time}")
        self.images, self.rounds, self.threads, self.min_run_time = images, rounds, threads, min_run_time
        self.report: dict[str, Any] | None = None

    @torch.no_grad()
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compile, time and print; a model without gates or without a registered backbone name is skipped."""
        if not getattr(pl_module, "gated", False) or not isinstance(pl_module.hparams.get("backbone"), str):
            return
        images = next(iter(trainer.datamodule.test_dataloader()))[0][: self.images].cpu()
        gated = copy.deepcopy(pl_module.model).cpu().eval()
        gated(images)  # the decisions these images get: their effective FLOPs, plus the gates' own
        profile = pl_module.profile
        masks = collect_masks(gated)
        ratio = (profile.effective(masks) + profile.gates(masks)).mean().item() / profile.dense_total
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the path is chosen at the thread count that is timed
        try:  # both in the path and memory layout they run faster in, on these images
            compiled = compile_for_inference(gated, dispatch=(1,), example=images)
            dense = compile_for_inference(dense_twin(pl_module).cpu(), dispatch=(1,), example=images)
        finally:
            torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"dense": [], "compiled": []}
        for _ in range(self.rounds):
            for name, model in (("dense", dense), ("compiled", compiled)):
                times[name].append(median_seconds(model, images, self.threads, self.min_run_time))
        dense_s, compiled_s = statistics.median(times["dense"]), statistics.median(times["compiled"])
        self.report = {"batch": 1, "images": len(images), "threads": self.threads, "rounds": self.rounds,
                       "dense_ms": 1e3 * dense_s, "compiled_ms": 1e3 * compiled_s,
                       "measured_speedup": dense_s / compiled_s, "theoretical_speedup": 1 / ratio,
                       "achieved_of_theoretical": (dense_s / compiled_s) * ratio,
                       "path": compiled.plan.path(1), "layout": compiled.plan.layout(1), "plan": compiled.plan.rows(),
                       "dense_layout": dense.plan.layout(1)}
        r = self.report
        print(f"latency at batch 1 ({r['threads']} thread(s), {r['images']} test images): BN-folded dense "
              f"{r['dense_ms']:.3f} ms, compiled gated {r['compiled_ms']:.3f} ms: measured speedup "
              f"{r['measured_speedup']:.2f}x vs theoretical {r['theoretical_speedup']:.2f}x from FLOPs "
              f"({r['achieved_of_theoretical']:.2f} of theory)")
        bucket = r["plan"][0] if r["plan"] else None
        if bucket is not None:
            print(f"  dispatch: the {r['path']} path in the {r['layout']} layout (timed when compiling: thin "
                  f"{bucket['thin_ms']:.3f} ms, masked {bucket['masked_ms']:.3f} ms per call; thin = only the kept "
                  f"compute, masked = dense compute x decisions, both exact; dense ran {r['dense_layout']})")
        if trainer.log_dir is not None:
            write_json(Path(trainer.log_dir) / "latency.json", self.report)


def profile_main(argv: Sequence[str] | None = None) -> None:
    """``dynprune profile-latency --config <fit config> --out table.json``: the latency lookup table of the config's
    gated model on this machine (:func:`dynprune.runtime.profile.profile_latency`), for ``cost: latency``."""
    import argparse

    from dynprune.io import read_yaml
    from dynprune.module import GatedClassifier
    from dynprune.runtime.profile import profile_latency

    parser = argparse.ArgumentParser(prog="dynprune profile-latency", description=profile_main.__doc__)
    parser.add_argument("--config", required=True, help="a fit config; its `model:` section builds the gated model")
    parser.add_argument("--out", required=True, help="the table's JSON path (a CSV of its rows is written beside it)")
    parser.add_argument("--batch", type=int, default=1, help="inputs per timed call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="kept fractions timed besides 0 and 1")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the median is kept)")
    args = parser.parse_args(argv)
    config = read_yaml(args.config)
    model_args = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model_args, dict):
        raise ValueError(f"config '{args.config}' has no `model:` section of GatedClassifier arguments")
    # The table depends on the architecture and its sites, not on weights: no checkpoint or teacher is loaded.
    model_args = {k: v for k, v in model_args.items() if k not in ("init_from", "teacher", "latency_table")}
    module = GatedClassifier(**model_args)
    if not module.gated:
        raise ValueError(f"config '{args.config}' builds a model without gates (gate: null): nothing to profile")
    table = profile_latency(module.model.eval(), batch=args.batch, fractions=args.fractions, rounds=args.rounds,
                            threads=args.threads)
    path = table.save(args.out)
    print(f"latency table of {len(table.sites)} sites ({args.threads} thread(s), batch {args.batch}, every unit kept: "
          f"{table.full_ms:.3f} ms) written to {path} and {path.with_suffix('.csv')}")
