"""Where a compiled gated model's time goes at batch 1: a per-function profile and per-site micro-timings.

1. ``torch.profiler`` (CPU, with Python stacks, 1 thread) over single-input forwards of ``compile_for_inference``
   of a trained gated checkpoint, pinned to its thin path, on Fashion-MNIST test images: each top-level aten op is
   charged to the innermost dynprune function on its Python stack (convs on their own line), and each dynprune
   Python frame's self time is listed; the rest is the profiler and ``nn.Module`` call glue. Profiling with stacks
   inflates every part (the unprofiled time per call is printed first): read the parts as shares.
2. Per gated site (``--sites``), on its real input: the ThinLayer call, the conv alone and the pool + SE net alone
   (``torch.utils.benchmark``, process CPU time).

    python experiments/profile_overhead.py --checkpoint ckpt.ckpt --sites layer1.0.conv1 layer3.1.conv1
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

from dynprune.runtime.compile import CompiledModel, compile_for_inference


def test_images(count: int) -> Tensor:
    """The first ``count`` Fashion-MNIST test images (count, 1, 28, 28)."""
    from dynprune.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(test_subset=count)
    data.setup("test")
    return torch.cat([b[0] for b in data.test_dataloader()])[:count]


def _frame(name: str) -> str | None:
    """'file:function' of a profiler Python-frame event inside dynprune/, else None."""
    if "dynprune/" not in name or ".py(" not in name:
        return None
    file, function = name.split("dynprune/", 1)[1].split(": ", 1)
    return f"{file.split('(')[0]}:{function}"


def _owner(event: object) -> tuple[bool, str]:
    """(whether an aten op is an ancestor, the innermost dynprune frame above ``event`` or 'outside dynprune')."""
    owner, parent = None, event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True, ""
        owner = owner or _frame(parent.name)
        parent = parent.cpu_parent
    return False, owner or "outside dynprune"


def breakdown(compiled: CompiledModel, images: Tensor) -> tuple[float, float, dict[str, float]]:
    """(unprofiled ms per call, profiled us per call, {part: profiled us per call}) over single-image calls."""
    singles = list(images.split(1))
    for x in singles:  # warm: packs of these masks cached, allocator
        compiled(x)
    start = time.process_time()
    for x in singles:
        compiled(x)
    unprofiled_ms = 1e3 * (time.process_time() - start) / len(singles)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        start = time.perf_counter()
        for x in singles:
            compiled(x)
        wall_us = 1e6 * (time.perf_counter() - start)
    parts: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.name.startswith("aten::"):
            nested, owner = _owner(event)
            if not nested:
                parts["conv2d ops" if event.name == "aten::conv2d" else f"ops in {owner}"] += event.cpu_time_total
        elif (frame := _frame(event.name)) is not None:
            parts[f"python self in {frame}"] += event.self_cpu_time_total
    parts["rest (profiler, nn.Module call glue)"] = wall_us - sum(parts.values())
    n = len(singles)
    return unprofiled_ms, wall_us / n, {k: v / n for k, v in parts.most_common()}


def site_times(compiled: CompiledModel, x: Tensor, site: str, min_run_time: float = 0.5) -> dict[str, float]:
    """Microseconds of the gated ThinLayer at ``site`` on its real input for ``x`` (1, ...), of its conv alone and
    of its gate's pool + SE net + threshold alone."""
    layer = compiled.net.get_submodule(site)
    seen: dict[str, Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    compiled(x)
    handle.remove()
    gate = layer.gate
    if gate is None:
        raise ValueError(f"site '{site}' has no gate of its own; give a gated layer (e.g. layer1.0.conv1)")
    env = {"layer": layer, "x": seen["x"], "conv": layer.layer, "g": gate, "F": F}
    stmts = {"ThinLayer": "layer(x)", "conv alone": "conv(x)",
             "pool + SE net": "F.linear(F.linear(x.mean((2, 3)), g.fc1.weight, g.fc1.bias).relu_(), g.fc2.weight, "
                              "g.fc2.bias) >= g.inference_threshold()"}
    with torch.inference_mode():
        return {k: 1e6 * benchmark.Timer(s, globals=env, timer=time.process_time).blocked_autorange(
            min_run_time=min_run_time).median for k, s in stmts.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained gated Fashion-MNIST checkpoint")
    parser.add_argument("--images", type=int, default=64, help="test images, one call each")
    parser.add_argument("--sites", nargs="*", default=[], help="gated layers to time alone")
    args = parser.parse_args(argv)
    from dynprune.module import GatedClassifier

    torch.set_num_threads(1)
    task = GatedClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    images = test_images(args.images)
    compiled = compile_for_inference(task.model, dispatch=()).pin("thin")
    unprofiled, profiled, parts = breakdown(compiled, images)
    print(f"unprofiled ms per call (process CPU time, 1 thread): {unprofiled:.3f}")
    print(f"profiled wall us per call: {profiled:.1f}")
    for part, us in parts.items():
        print(f"  {us:8.1f}  {part}")
    for site in args.sites:
        times = site_times(compiled, images[:1], site)
        print(f"{site}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
