"""Before/after bit identity of a reduced run: tiny gated ResNet-20s (half width, 8x8 digits) trained 6 steps at
1 thread and a fixed seed, at every granularity (channel, block, width, two width lists, block + channel) and
with gates starting open or mixed; prints a sha256 prefix of each state_dict and of the compiled model's
output on a fixed batch, and the validation FLOPs mean. Run it on two commits and diff the output:

    PYTHONPATH=$PWD python experiments/bit_identity.py > after.txt

The numbers are only comparable on the same machine, torch build and thread count. (Before granularity options
existed, ``width2`` was spelt ``granularity="width", gate_kwargs={"widths": [0.5, 1.0]}``.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings

import lightning as L
import torch

import dynprune as dp
from dynprune.runtime import compile_for_inference

RUNS = {
    "channel": dict(gate="sigmoid", granularity="channel"),
    "block": dict(gate="gumbel", granularity="block"),
    "width": dict(gate="sigmoid", granularity="width", width_targets=0.5, target=0.5),
    "width2": dict(gate="l1", granularity={"width": {"widths": [0.5, 1.0]}}),
    "channel_mixed": dict(gate="sigmoid", granularity="channel", lam=4.0, gate_kwargs={"init_bias": 0.0}),
    "width_mixed": dict(gate="gumbel", granularity="width", lam=4.0, gate_kwargs={"init_bias": 0.0}),
    "block+channel": dict(gate="policy", granularity=["block", "channel"],
                          where={"block": ["layer1.?", "layer2.1"], "channel": ["layer3.*.conv1"]}),
}


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 prefix of tensors (keys sorted)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(name: str, kwargs: dict, out: str) -> str:
    """One reduced run: 'name state-digest output-digest flops-mean'."""
    L.seed_everything(0, verbose=False)
    module = dp.GatedClassifier("resnet20", input_size=8, width_mult=0.5, lr=0.05, **{"lam": 1.0, **kwargs})
    flops = dp.FlopsCallback(dirpath=out, plot=False, verbose=False)
    trainer = L.Trainer(max_steps=6, limit_val_batches=2, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1, callbacks=[flops])
    trainer.fit(module, dp.DigitsDataModule(batch_size=32))
    model = module.model.eval()
    with torch.no_grad():  # a training pass leaves graph tensors on some gates, which deepcopy refuses
        model(torch.zeros(1, 1, 8, 8))
    for gate in dp.gates_of(model).values():
        if hasattr(gate, "_dist"):
            gate._dist = None
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    compiled = compile_for_inference(model)(x)
    mean = flops.reports["val"]["summary"]["flops_mean"]
    return f"{name} {digest(module.state_dict())} {digest({'out': compiled})} {mean:.1f}"


def main() -> None:
    os.environ["WANDB_MODE"] = "disabled"
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        for name, kwargs in RUNS.items():
            print(run(name, kwargs, out), flush=True)


if __name__ == "__main__":
    main()
