"""Measured CPU latency against theoretical speedup: dense, masked, compiled dynamic, static and uniform nets.

For each model (ResNet-20 at 28x28 and 32x32, VGG-11-BN at 32x32; with ``--models``, ResNet-18 / ResNet-50 /
EfficientNet-Lite0 at 224x224, defined here) the forms are
- ``dense``: BN folded (``compile_for_inference`` of the unpruned net): the baseline of every speedup; like every
  compiled form, it runs the memory layout (NCHW or channels-last) its plan timed faster per batch size;
- ``masked <granularity>``: the gated model as training runs it (all compute, then the mask);
- ``compiled <granularity>``: ``compile_for_inference`` of the gated model, each call dispatched to the faster of
  its two exact paths as timed at compile time per batch size at the smallest thread count (``CompiledModel.plan``);
- ``thin <granularity>``: the same compiled model pinned to its thin path: only the kept compute runs;
- ``static_l1``: L1-filter pruned to the same FLOPs and physically thinned, BN folded;
- ``uniform``: the net built with ``width_mult`` at the same FLOPs, BN folded: the ceiling.
Untrained gates get a calibrated last-layer bias so each unit is on for a chosen fraction of inputs
(always-on, always-off and input-dependent units, see ``calibrate_gates``); the mean keep rate is bisected
until the mean effective FLOPs reach dense / ``--ratio``. Times are medians of ``torch.utils.benchmark``
``blocked_autorange`` after a warm-up; each configuration is measured ``--repeats`` times interleaved
across forms and the fastest median is kept (a load spike on a shared machine hits all forms alike).

    python experiments/bench_latency.py                # the full table (a few minutes on 2 cores)
    python experiments/bench_latency.py --smoke        # tiny sizes, 2 repeats (used by the tests)
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark

import dynprune as dp
from dynprune.flops import count_flops
from dynprune.io import atomic_write, save_figure, to_markdown, write_csv
from dynprune.runtime import compile_for_inference
from dynprune.runtime.blocks import SubBatchBlock
from dynprune.runtime.channels import ThinLayer
from dynprune.runtime.profile import machine as cpu_and_torch

RESULTS = Path(__file__).parent / "results"


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 block: two 3x3 convs, a 1x1 strided projection when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch (N, C_in, H, W) -> (N, C_out, H', W')."""
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W')."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.branch(x) + shortcut)


class Bottleneck(BasicBlock):
    """torchvision's ResNet-50 block: 1x1 reduce, 3x3 (strided), 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__(cin, width, stride)
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch (N, C_in, H, W) -> (N, 4 width, H', W')."""
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.bn3(self.conv3(y))


class ImageNetResNet(nn.Module):
    """torchvision-style ResNet-18 / ResNet-50 at 224x224 (torchvision itself does not import beside torch
    2.13 here), every width scaled by ``width_mult`` (the uniform ceiling)."""

    def __init__(self, depth: int, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 input_size: int = 224) -> None:
        super().__init__()
        block, counts = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]
        widths = [max(1, round(w * width_mult)) for w in (64, 128, 256, 512)]
        self.input_shape = (in_chans, input_size, input_size)
        self.conv1, self.bn1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, counts, strict=True)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 224, 224) -> (N, classes)."""
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expand (ReLU6), depthwise k x k (ReLU6), 1x1 project, no SE."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = (nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
                       if expand != 1 else None)
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W')."""
        y = self.project(self.dw(x if self.expand is None else self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (ReLU6, no squeeze-excitation, fixed stem and head) at 224x224, its block widths scaled by
    ``width_mult`` (the uniform ceiling); written here since timm is not installed beside torch 2.13."""

    stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # (expand, kernel, stride, channels, repeats)

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 input_size: int = 224) -> None:
        super().__init__()
        self.input_shape = (in_chans, input_size, input_size)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        blocks, cin = [], 32
        for expand, kernel, stride, channels, repeats in self.stages:
            for i in range(repeats):
                cout = max(1, round(channels * width_mult))
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 224, 224) -> (N, classes)."""
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


LOCAL_BACKBONES = {"resnet18": lambda **kw: ImageNetResNet(18, **kw), "resnet50": lambda **kw: ImageNetResNet(50, **kw),
                   "efficientnet_lite0": EfficientNetLite0}
MODELS: dict[str, dict[str, Any]] = {
    "resnet20_28": dict(backbone="resnet20", in_chans=1, input_size=28),
    "resnet20_32": dict(backbone="resnet20", in_chans=3, input_size=32),
    "vgg11_32": dict(backbone="vgg11", in_chans=3, input_size=32),
    "resnet18_224": dict(backbone="resnet18", in_chans=3, input_size=224),
    "resnet50_224": dict(backbone="resnet50", in_chans=3, input_size=224),
    "efficientnet_lite0_224": dict(backbone="efficientnet_lite0", in_chans=3, input_size=224),
}
# batch <= 8 and no masked / static forms (CPU minutes per pass)
LARGE = {"resnet18_224", "resnet50_224", "efficientnet_lite0_224"}
SMOKE_MODELS: dict[str, dict[str, Any]] = {
    "resnet20_8": dict(backbone="resnet20", in_chans=1, input_size=8, width_mult=0.5),
}
GRANULARITIES = ("channel", "block", "width")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures and how long it may take."""

    ratio: float = 2.0
    dynamic: float = 0.3
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    threads: tuple[int, ...] = (1,)
    repeats: int = 2
    min_run_time: float = 0.05
    flops_tol: float = 1e-2
    calib_size: int = 32
    bisect_steps: int = 8
    seed: int = 0
    images: int = 64


SMOKE = Settings(batch_sizes=(1, 4), repeats=2, min_run_time=0.0, flops_tol=0.1, calib_size=16, bisect_steps=6,
                 images=8)


@dataclass
class Form:
    """One way of running a model: a callable on a batch, its mean effective FLOPs per input."""

    name: str
    run: Callable[[Tensor], Tensor]
    flops: float
    module: nn.Module


def unit_probabilities(units: int, keep: float, dynamic: float, gen: torch.Generator) -> Tensor:
    """(units,) on-probabilities with mean ``keep``: a share ``dynamic`` of units at 0.5 (input-dependent),
    the rest always on (1) or always off (0), placed at random; dynamic units shrink if keep is extreme."""
    n_dyn = min(round(dynamic * units), round(2 * min(keep, 1 - keep) * units))
    n_on = max(0, min(units - n_dyn, round(keep * units - 0.5 * n_dyn)))
    probs = torch.zeros(units)
    probs[:n_on] = 1.0
    probs[n_on : n_on + n_dyn] = 0.5
    return probs[torch.randperm(units, generator=gen)]


@torch.no_grad()
def calibrate_gates(model: nn.Module, inputs: Tensor, probs: dict[str, Tensor]) -> Tensor:
    """Set each gate's last bias (in call order, in one pass over ``inputs``) so that unit u of site s is on
    for a fraction ``probs[s][u]`` of the inputs; returns the effective FLOPs ratio per input (N,)."""
    info = dp.gating_info(model)
    handles = []
    for name, gate in dp.gates_of(model).items():
        def hook(gate: nn.Module, args: tuple, p: Tensor = probs[name]) -> None:
            raw = gate.logits(args[0]) - gate.fc2.bias
            thresholds = torch.quantile(raw, (1 - p).clamp(0, 1), dim=0).diagonal()
            bias = torch.where(p >= 1, 1e4, torch.where(p <= 0, -1e4, -thresholds))
            gate.fc2.bias.copy_(bias)

        handles.append(gate.register_forward_pre_hook(hook))
    try:
        model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    return info.flops.ratio(dp.collect_masks(model))


def gated_at_ratio(
    net: nn.Module, granularity: str, ratio: float, inputs: Tensor, dynamic: float, seed: int = 0, steps: int = 10,
) -> tuple[nn.Module, float]:
    """A sigmoid-gated copy of ``net`` whose mean effective FLOPs on ``inputs`` are dense / ``ratio`` (``steps``
    of bisection on the mean keep rate); returns (model, mean FLOPs ratio reached)."""
    model = dp.gate_model(copy.deepcopy(net), gate="sigmoid", granularity=granularity).eval()
    units = {name: site.units for name, site in dp.gating_info(model).sites.items()}
    lo, hi, reached = 0.0, 1.0, 1.0
    for _ in range(steps):
        keep = (lo + hi) / 2
        gen = torch.Generator().manual_seed(seed)
        share = dynamic if granularity == "channel" else 1.0
        probs = {name: unit_probabilities(n, keep, share, gen) if n > 1 else torch.tensor([keep])
                 for name, n in units.items()}
        reached = float(calibrate_gates(model, inputs, probs).mean())
        lo, hi = (lo, keep) if reached > 1 / ratio else (keep, hi)
    return model, reached


def uniform_at_ratio(spec: dict[str, Any], ratio: float) -> nn.Module:
    """The backbone built with the ``width_mult`` (step 1/64, bisected) whose FLOPs are closest to dense / ``ratio``."""
    shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
    base = spec.get("width_mult", 1.0)
    target = count_flops(build(spec), shape)[0] / ratio
    flops = {64: int(target * ratio)}

    def at(step: int) -> int:
        if step not in flops:
            flops[step] = count_flops(build(spec, base * step / 64), shape)[0]
        return flops[step]

    lo, hi = 1, 64  # FLOPs grow with the width: find the smallest step at or above the target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) >= target else (mid, hi)
    step = min((lo, hi), key=lambda s: abs(at(s) - target))
    return build(spec, base * step / 64)


def static_at_ratio(net: nn.Module, ratio: float, shape: tuple[int, ...], tol: float) -> nn.Module:
    """L1-filter pruned to dense / ``ratio`` FLOPs (channel fraction bisected to ``tol``) and physically
    thinned; the weights are untrained (only speed matters here)."""
    fraction = dp.static.fraction_for_flops(net, ratio, shape, tol=tol)
    return dp.static.remove_channels(dp.static.prune_model(copy.deepcopy(net), "l1_structured", fraction))


def build(spec: dict[str, Any], width_mult: float | None = None) -> nn.Module:
    """The backbone of ``spec``, eval mode, BN statistics randomised (folding must not be a no-op)."""
    kwargs = {k: v for k, v in spec.items() if k != "backbone"}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    make = LOCAL_BACKBONES.get(spec["backbone"], functools.partial(dp.backbones.create, spec["backbone"]))
    net = make(**kwargs).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def forms_of(spec: dict[str, Any], cfg: Settings) -> tuple[list[Form], float]:
    """Every form of one model; returns (forms, dense FLOPs per input)."""
    ratio = cfg.ratio
    shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
    net = build(spec)
    dense_flops = count_flops(net, shape)[0]
    large = spec["backbone"] in LOCAL_BACKBONES
    calib, steps = (8, 6) if large else (cfg.calib_size, cfg.bisect_steps)  # 224x224: CPU minutes per pass
    timed = [b for b in cfg.batch_sizes if not large or b <= 8]  # the batch sizes bench() times
    example, threads = torch.randn(calib, *shape), min(cfg.threads)
    forms = [Form("dense", dispatched(net, timed, example, threads), dense_flops, net)]
    for granularity in ("channel", "block") if large else GRANULARITIES:
        try:
            gated, reached = gated_at_ratio(net, granularity, ratio, torch.randn(calib, *shape), cfg.dynamic,
                                             cfg.seed, steps)
        except ValueError as err:  # e.g. no residual blocks to gate in VGG
            print(f"  skip {granularity}: {err}")
            continue
        flops = reached * dense_flops
        if not large:
            forms.append(Form(f"masked {granularity}", gated, flops, gated))
        forms += compiled_forms(gated, granularity, flops, timed, example, threads)
    if not large:
        static = static_at_ratio(net, ratio, shape, cfg.flops_tol)
        static_flops = count_flops(static, shape)[0]
        forms.append(Form("static_l1", dispatched(static, timed, example, threads, shape), static_flops, static))
    uniform = uniform_at_ratio(spec, ratio)
    uniform_flops = count_flops(uniform, shape)[0]
    forms.append(Form("uniform", dispatched(uniform, timed, example, threads), uniform_flops, uniform))
    return forms, dense_flops


def dispatched(net: nn.Module, batch_sizes: Sequence[int], example: Tensor, threads: int,
               shape: tuple[int, ...] | None = None) -> nn.Module:
    """``compile_for_inference`` of ``net`` with its plan (paths of a gated model, memory layouts of any) timed on
    ``example`` (N, ...) at ``batch_sizes`` and ``threads``: every form, dense included, runs its faster layout."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return compile_for_inference(net, shape, dispatch=batch_sizes, example=example)
    finally:
        torch.set_num_threads(previous)


def compiled_forms(gated: nn.Module, granularity: str, flops: float, batch_sizes: Sequence[int],
                   example: Tensor, threads: int) -> list[Form]:
    """The compiled gated model, dispatched by a plan timed on ``example`` (N, ...) at ``batch_sizes`` and
    ``threads``, and a copy pinned to its thin path (in the plan's layouts)."""
    compiled = dispatched(gated, batch_sizes, example, threads)
    print(f"  {granularity}: {compiled.plan}")
    thin = copy.deepcopy(compiled).pin("thin")
    return [Form(f"compiled {granularity}", compiled, flops, compiled), Form(f"thin {granularity}", thin, flops, thin)]


def trained_forms(path: Path, images: int, batch_sizes: Sequence[int],
                  threads: int) -> tuple[list[Form], float, Tensor]:
    """dense / masked / compiled forms of a trained gated checkpoint and the uniform net at its mean FLOPs on the
    first ``images`` Fashion-MNIST test images; returns (forms, dense FLOPs, those images (N, 1, 28, 28))."""
    from dynprune.data import FashionMNISTDataModule
    from dynprune.module import GatedClassifier

    task = GatedClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    gated = task.model
    info = dp.gating_info(gated)
    shape = info.flops.input_shape
    data = FashionMNISTDataModule(test_subset=images)
    data.setup("test")
    x = torch.cat([b[0] for b in data.test_dataloader()])[:images]
    with torch.no_grad():
        gated(x)
    flops = float(info.flops.effective(dp.collect_masks(gated)).mean())
    hp = task.hparams
    spec = dict(backbone=hp["backbone"], in_chans=shape[0], input_size=shape[1], num_classes=10)
    dense = build(spec)
    dense.load_state_dict(gated.state_dict(), strict=False)  # gated modules keep their keys; gates are extra
    dense_flops = float(info.flops.dense_total)
    granularity = "+".join(info.granularities)
    uniform = uniform_at_ratio(spec, dense_flops / flops)
    forms = [Form("dense", dispatched(dense.eval(), batch_sizes, x, threads), dense_flops, dense),
             Form(f"masked {granularity}", gated, flops, gated),
             *compiled_forms(gated, granularity, flops, batch_sizes, x, threads),
             Form("uniform", dispatched(uniform, batch_sizes, x, threads), count_flops(uniform, shape)[0], uniform)]
    return forms, dense_flops, x


def clock(threads: int) -> Callable[[], float]:
    """Process CPU time at 1 thread (on a shared machine it leaves out the waits for a core), else wall time."""
    return time.process_time if threads == 1 else time.perf_counter


def timer_of(form: Form, batches: Sequence[Tensor], threads: int) -> benchmark.Timer:
    """A ``torch.utils.benchmark`` timer of one call of ``form`` on the next of ``batches`` (cycled), warmed up."""
    cycle = itertools.cycle(batches)
    timer = benchmark.Timer("with torch.inference_mode(): run(next(cycle))",
                            globals={"run": form.run, "cycle": cycle, "torch": torch}, num_threads=threads,
                            timer=clock(threads))
    timer.timeit(min(len(batches), 8))  # warm-up
    return timer


def samples(timer: benchmark.Timer, calls: int) -> list[float]:
    """Seconds of ``calls`` single calls."""
    return [timer.timeit(1).median for _ in range(calls)]


def gate_share(form: Form, batch: Tensor, threads: int, min_run_time: float) -> float:
    """Seconds a compiled form spends deciding per batch: every gate call of one forward pass (pooling and
    scattering its input included) is recorded, then re-run alone and timed like the whole model."""
    calls: list[tuple[Callable[..., Tensor], tuple[Any, ...]]] = []

    def record(module: nn.Module, args: tuple) -> None:
        if isinstance(module, ThinLayer) and module.gate is not None:
            calls.append((module.decide, (args[0], module.input_columns())))
        elif isinstance(module, SubBatchBlock):
            calls.append((module.decisions, (args[0],)))

    handles = [m.register_forward_pre_hook(record) for m in form.module.modules()
               if isinstance(m, (ThinLayer, SubBatchBlock))]
    try:
        form.run(batch)
    finally:
        for h in handles:
            h.remove()
    timer = benchmark.Timer("with torch.inference_mode():\n    for f, a in calls: f(*a)",
                            globals={"calls": calls, "torch": torch}, num_threads=threads, timer=clock(threads))
    timer.timeit(2)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def profile_summary(form: Form, batch: Tensor, threads: int, iters: int = 10) -> str:
    """torch.profiler table of one form (top ops by self CPU time)."""
    torch.set_num_threads(threads)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            form.run(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def bench(
    models: dict[str, dict[str, Any]], cfg: Settings, done: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """All rows of the table and the profile text of the worst dynamic row; ``done(rows)`` after each model."""
    rows: list[dict[str, Any]] = []
    worst: tuple[float, Form, Tensor, int, str] | None = None
    for model_name, spec in models.items():
        torch.manual_seed(cfg.seed)
        shape = (spec["in_chans"], spec["input_size"], spec["input_size"])
        images = None
        if "checkpoint" in spec:
            print(f"{model_name}: trained checkpoint {spec['checkpoint']}")
            forms, dense_flops, images = trained_forms(Path(spec["checkpoint"]), cfg.images, cfg.batch_sizes,
                                                        min(cfg.threads))
        else:
            print(f"{model_name}: building forms at {cfg.ratio}x fewer FLOPs")
            forms, dense_flops = forms_of(spec, cfg)
        large = spec["backbone"] in LOCAL_BACKBONES
        for batch_size, n_threads in itertools.product(cfg.batch_sizes, cfg.threads):
            if large and batch_size > 8:
                continue
            n_batches = max(1, cfg.images // batch_size)
            batches = ([images[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)] if images is not None
                       else [torch.randn(batch_size, *shape) for _ in range(n_batches)])
            timers = {f.name: timer_of(f, batches, n_threads) for f in forms}
            once = max(timers[f.name].timeit(1).median for f in forms)
            calls = max(2, math.ceil(cfg.min_run_time / once))
            times: dict[str, list[float]] = {f.name: [] for f in forms}
            for _ in range(cfg.repeats):  # interleaved: a load spike hits every form alike
                for f in forms:
                    times[f.name] += samples(timers[f.name], calls)
            p50 = {name: float(np.percentile(t, 50)) for name, t in times.items()}
            p99 = {name: float(np.percentile(t, 99)) for name, t in times.items()}
            uniform = next(f for f in forms if f.name == "uniform")
            ceiling = p50["dense"] / p50["uniform"] / (dense_flops / uniform.flops)
            for f in forms:
                theoretical = dense_flops / f.flops
                achieved = p50["dense"] / p50[f.name]
                row = {"model": model_name, "form": f.name, "batch": batch_size, "threads": n_threads,
                       "clock": "cpu" if n_threads == 1 else "wall", "samples": len(times[f.name]),
                       "latency_ms": 1e3 * p50[f.name], "p99_ms": 1e3 * p99[f.name],
                       "images_per_s": batch_size / p50[f.name], "theoretical": theoretical, "achieved": achieved,
                       "ratio": achieved / theoretical, "ceiling_ratio": ceiling,
                       "of_ceiling": achieved / theoretical / ceiling, "gate_share": ""}
                if f.name.startswith("compiled"):
                    row["gate_share"] = gate_share(f, batches[0], n_threads, cfg.min_run_time) / p50[f.name]
                    if worst is None or row["ratio"] < worst[0]:
                        worst = (row["ratio"], f, batches[0], n_threads,
                                 f"{model_name} {f.name} batch {batch_size} threads {n_threads}")
                rows.append(row)
            print(to_markdown([r for r in rows if r["model"] == model_name and r["batch"] == batch_size
                               and r["threads"] == n_threads]))
        if done is not None:
            done(rows)
    profile = ""
    if worst is not None:
        profile = f"# Worst compiled row: {worst[4]} (achieved/theoretical {worst[0]:.3f})\n\n"
        profile += profile_summary(worst[1], worst[2], worst[3])
    return rows, profile


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """achieved / theoretical speedup per form against batch size, one panel per model and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["threads"]) for r in rows})
    forms = list(dict.fromkeys(r["form"] for r in rows if r["form"] != "dense"))
    colors = dict(zip(forms, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]), strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (model, threads) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if r["model"] == model and r["threads"] == threads]
        for form in forms:
            pts = sorted((r["batch"], r["ratio"]) for r in sub if r["form"] == form)
            if pts:
                style = "--" if form.startswith("masked") else ":" if form.startswith("thin") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colors[form], label=form)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.5)
        ax.set_title(f"{model}, {threads} thread(s)", fontsize=9)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("achieved / theoretical speedup")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def machine() -> str:
    """CPU model, core count, torch version and load average, for the result files."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{cpu_and_torch()}, load average {load}"


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """achieved / theoretical per form, one row per model, threads and batch size (the ceiling: ``uniform``)."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in rows:
        if r["form"] != "dense":
            key = (r["model"], r["threads"], r["batch"])
            out.setdefault(key, {"model": key[0], "threads": key[1], "batch": key[2]})[r["form"]] = r["ratio"]
    return list(out.values())


def report(rows: Sequence[dict[str, Any]], cfg: Settings, command: str, start: str) -> str:
    """The markdown result file: command, machine, settings, summary and full table."""
    return (f"# Measured latency vs theoretical speedup at {cfg.ratio:g}x fewer FLOPs\n\n"
            f"Command: `{command}`\n\nMachine: {start} at the start; {machine()} at the end. Threads: "
            f"{', '.join(map(str, cfg.threads))} (`torch.utils.benchmark.Timer(num_threads=...)`).\n\n"
            f"Timing: `torch.utils.benchmark.Timer` of single calls, {cfg.repeats} rounds interleaved across the "
            f"forms (each form >= {cfg.min_run_time} s per round); latency_ms = p50, p99_ms = p99 of those calls. "
            f"Clock: process CPU time at 1 thread (the machine is shared: CPU time leaves out the waits for a core), "
            f"wall time at 2 threads. Inputs cycle through {cfg.images} distinct images (random, or Fashion-MNIST "
            f"test images for trained checkpoints). Synthetic gates: sigmoid, untrained, last bias calibrated so "
            f"that per layer a share {cfg.dynamic:g} of channels is input-dependent (on for half the inputs), the "
            f"rest always on/off (blocks: every block input-dependent); mean keep rate bisected to the target "
            f"FLOPs. Dense, static and uniform nets are BN-folded; uniform = the backbone at the width of equal "
            f"FLOPs (the static ceiling); `gate_share` = time of the gate calls alone / time of the compiled model."
            f"\n\n## achieved / theoretical speedup (uniform = the static ceiling)\n\n{to_markdown(summary(rows))}"
            f"\n## All rows\n\n{to_markdown(rows)}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 repeats, no minimum run time")
    parser.add_argument("--ratio", type=float, default=2.0, help="target dense / mean effective FLOPs")
    parser.add_argument("--dynamic", type=float, default=0.3, help="share of input-dependent channels per layer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds over the forms")
    parser.add_argument("--min-run-time", type=float, default=0.05, help="seconds per form and round")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=[m for m in MODELS if m not in LARGE])
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[],
                        help="trained gated Fashion-MNIST checkpoints, timed on real test images")
    parser.add_argument("--images", type=int, default=64, help="distinct inputs cycled per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_latency")
    args = parser.parse_args(argv)
    if args.smoke:
        models, cfg = SMOKE_MODELS, replace(SMOKE, ratio=args.ratio, dynamic=args.dynamic)
    else:
        models = {name: MODELS[name] for name in args.models}
        for path in args.checkpoint:
            models[f"trained:{path.parent.parent.name}/{path.name}"] = dict(
                backbone="trained", in_chans=1, input_size=28, checkpoint=str(path))
        cfg = Settings(args.ratio, args.dynamic, tuple(args.batch_sizes), tuple(args.threads), args.repeats,
                       args.min_run_time, images=args.images)
    start = machine()
    command = "python experiments/bench_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(rows: list[dict[str, Any]]) -> None:
        write_csv(args.out.with_name(args.out.name + ".csv"), rows)
        atomic_write(args.out.with_name(args.out.name + ".md"), lambda f: f.write(report(rows, cfg, command, start)))

    rows, profile = bench(models, cfg, write)
    plot(rows, args.out.with_name(args.out.name + ".png"))
    atomic_write(args.out.with_name(args.out.name + "_profile.txt"), lambda f: f.write(profile))
    print(to_markdown(summary(rows)))
    print(profile)
    return rows


if __name__ == "__main__":
    main()
