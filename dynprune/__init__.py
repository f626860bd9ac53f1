"""dynprune: dynamic (input-dependent) pruning, with static pruning and compression baselines.

Public API::

    import dynprune as dp
    net = dp.backbones.create("resnet20", num_classes=10, in_chans=1)
    gated = dp.gate_model(net, gate="sigmoid")
    module = dp.GatedClassifier(gated, lam=0.5)
    trainer = lightning.Trainer(max_epochs=1, callbacks=[dp.FlopsCallback()])
"""

from dynprune import backbones, gates, granularity
from dynprune.backbones import list_backbones, register_backbone
from dynprune.callbacks import EpochTimer, FlopsCallback
from dynprune.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)
from dynprune.flops import FlopsProfile, count_flops
from dynprune.gates import Gate, create_gate, list_gates, register_gate
from dynprune.granularity import list_granularities
from dynprune.inject import collect_masks, gate_model, gated_modules, gates_disabled, gates_of, gating_info
from dynprune.module import GatedClassifier

__version__ = "0.1.0"

_LAZY = ("static", "compression", "sweep", "guard", "slimmable")


def __getattr__(name: str) -> object:
    """``dp.static``, ``dp.compression``, ``dp.sweep``, ``dp.guard``, ``dp.slimmable``: imported on first
    use (they pull in scikit-learn, bitarray, ...), so ``import dynprune`` stays light."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"dynprune.{name}")
    raise AttributeError(f"module 'dynprune' has no attribute '{name}'")

__all__ = [
    "CIFAR10DataModule", "DigitsDataModule", "EpochTimer", "FashionMNISTDataModule", "FlopsCallback", "FlopsProfile",
    "Gate", "GatedClassifier", "ImageFolderDataModule", "backbones", "collect_masks", "count_flops",
    "create_gate", "gate_model", "gated_modules", "gates", "gates_disabled", "gates_of", "gating_info", "granularity",
    "list_backbones", "list_gates", "list_granularities",
    "register_backbone", "register_gate",
]
