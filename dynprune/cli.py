"""The ``dynprune`` command: LightningCLI (``fit|validate|test|predict --config ...``) plus ``sweep``.

Examples::

    dynprune fit --config configs/fmnist_resnet20_sigmoid.yaml --model.lam 0.1
    dynprune sweep configs/sweeps/lam.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dynprune.callbacks import EpochTimer, FlopsCallback
from dynprune.guard import CollapseGuard
from dynprune.module import GatedClassifier


class DynpruneCLI(LightningCLI):
    """LightningCLI with a FlopsCallback, a CollapseGuard and a last-checkpoint always on, and
    ``--test_after_fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FlopsCallback, "flops")
        parser.add_lightning_class_args(EpochTimer, "timer")
        parser.add_lightning_class_args(CollapseGuard, "guard")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/acc",
                             "checkpoint.mode": "max", "checkpoint.filename": "best"})
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="run `test` on the final weights after `fit` and print the FLOPs report")

    def after_fit(self) -> None:
        """Optionally evaluate on the test set right after training (used by the demo)."""
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def cli_main(args: Sequence[str] | None = None) -> DynpruneCLI:
    """Run the LightningCLI on ``args`` (default: ``sys.argv[1:]``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    return DynpruneCLI(
        GatedClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``dynprune`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "sweep":
        from dynprune.sweep import sweep_main

        sweep_main(args[1:])
        return
    cli_main(argv)


if __name__ == "__main__":
    main()
