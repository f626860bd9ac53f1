"""How much of a channel-gated ResNet-50's batch-1 time at 224x224 is gathering each new mask's weights.

The compiled runtime gathers, per distinct mask, the kept rows (and the reader's present columns) of a layer's
weights into a packed copy, cached least recently used first up to ``ThinLayer.cache_factor`` times the layer's
weights. Synthetic gates with 30% input-dependent channels give nearly every image its own mask, so cycling through
more images than the cache holds gathers on every call. This script times, at 1 thread and channels-last on the thin
path: the dense model; the gated model cycling 8 images (all masks cached); 64 images with the default cache; 64
images with a cache that holds them all. The difference between the last two is the gather cost.

    python experiments/pack_cache_224.py            # about 3 minutes on one core
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_latency as bl  # noqa: E402  (the ImageNet-size ResNets and the synthetic gates)

from dynprune.runtime import compile_for_inference  # noqa: E402
from dynprune.runtime.channels import ThinLayer  # noqa: E402


def ms_per_image(model: torch.nn.Module, images: torch.Tensor, count: int, reps: int = 2) -> float:
    """Process-CPU ms per call over ``reps`` passes through the first ``count`` images (after one warm pass)."""
    with torch.inference_mode():
        for i in range(count):
            model(images[i : i + 1])
        start = time.process_time()
        for _ in range(reps):
            for i in range(count):
                model(images[i : i + 1])
    return (time.process_time() - start) / (reps * count) * 1e3


def main() -> None:
    """Print the four timings."""
    torch.set_num_threads(1)
    spec, shape = bl.MODELS["resnet50_224"], (3, 224, 224)
    net = bl.build(spec)
    gated, _ = bl.gated_at_ratio(net, "channel", 2.0, torch.randn(8, *shape), 0.3, 0, 6)
    images = torch.randn(64, *shape)
    compiled = compile_for_inference(gated, dispatch=(), example=images).pin("thin", "channels_last")
    dense = compile_for_inference(net, dispatch=()).pin(None, "channels_last")
    layers = [m for m in compiled.net.modules() if isinstance(m, ThinLayer)]
    print(f"dense: {ms_per_image(dense, images, 8):.1f} ms")
    default = ThinLayer.cache_factor
    try:
        for factor in (default, 1000):
            ThinLayer.cache_factor = factor
            for layer in layers:
                layer.clear_cache()
            print(f"cache_factor {factor}: 8 images {ms_per_image(compiled, images, 8):.1f} ms, 64 images "
                  f"{ms_per_image(compiled, images, 64):.1f} ms")
    finally:
        ThinLayer.cache_factor = default


if __name__ == "__main__":
    main()
