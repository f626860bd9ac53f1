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
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from dynprune.callbacks import EpochTimer, FlopsCallback
from dynprune.guard import CollapseGuard
from dynprune.io import atomic_write
from dynprune.module import GatedClassifier


class SaveConfigNextToCheckpoints(SaveConfigCallback):
    """Save the resolved config to the log dir (Lightning's default) and, atomically, next to the checkpoints."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(os.path.join(ckpt.dirpath, self.config_filename), lambda f: f.write(text))


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
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                                "init_args": {"project": "dynprune"}}})
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="run `test` on the final weights after `fit` and print the FLOPs report")

    def before_instantiate_classes(self) -> None:
        """A WandbLogger left at ``save_dir: .`` writes under ``trainer.default_root_dir`` instead."""
        trainer = self._get(self.config, "trainer")
        logger = trainer.get("logger")
        if (isinstance(logger, Namespace) and logger.class_path.endswith(".WandbLogger")
                and str(logger.init_args.get("save_dir")) == "." and trainer.get("default_root_dir")):
            logger.init_args.save_dir = trainer.default_root_dir

    def instantiate_trainer(self, **kwargs: object) -> L.Trainer:
        """Add a RichProgressBar unless the config disables the bar or brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Optionally evaluate on the test set right after training (used by the demo)."""
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def cli_main(args: Sequence[str] | None = None) -> DynpruneCLI:
    """Run the LightningCLI on ``args`` (default: ``sys.argv[1:]``)."""
    if "WANDB_SWEEP_ID" not in os.environ:  # a `wandb agent` run reports to its server
        os.environ.setdefault("WANDB_MODE", "offline")
    return DynpruneCLI(
        GatedClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_callback=SaveConfigNextToCheckpoints,
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
