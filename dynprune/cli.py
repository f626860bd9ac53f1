"""The ``dynprune`` command: LightningCLI (``fit|validate|test|predict --config ...``) plus ``sweep``.

Examples::

    dynprune fit --config configs/fmnist_resnet20_sigmoid.yaml --model.lam 0.1
    dynprune fit --config configs/fmnist_resnet20_sigmoid.yaml --ckpt_path last   # resume the last run
    dynprune sweep configs/sweeps/lam.yaml

Precedence of a checkpoint's hyperparameters (``--ckpt_path``) over the config:

- ``fit`` (resume): the config must agree with the checkpoint; every differing value is listed in an error,
  unless ``--override_checkpoint_hparams true`` (then the config's values are used, with a warning).
- ``validate|test|predict``: the checkpoint defines the model; a differing model-defining value (backbone,
  gate, sizes, ``where``, ``gate_kwargs``, ...) is an error unless overridden, a differing training-only value
  (``lam``, ``lr``, ...) is replaced by the checkpoint's, with a warning.
- A checkpoint of another backbone is always an error naming both.

Exit status: 0 when the command finished; 2 for a config or checkpoint error (the message names the key, value or
file); 143 (128 + SIGTERM, as a shell reports a process that SIGTERM ended) when SIGTERM (e.g. a preempted job)
stopped ``fit`` after its current step: the run is resumable, its ``last.ckpt`` holds the last completed epoch
(written at the end of every epoch) and ``--ckpt_path last`` continues it to the same weights.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dynprune.callbacks import EpochTimer, FlopsCallback, GatedCheckpoint
from dynprune.data import check_num_classes
from dynprune.guard import CollapseGuard
from dynprune.io import CheckpointError, atomic_write, check_yaml, read_checkpoint, run_dir
from dynprune.module import GatedClassifier

LAST = "last.ckpt"
PREEMPTED = 143  # exit status after SIGTERM: stopped, resumable with --ckpt_path last (module docstring)
EVAL_COMMANDS = ("validate", "test", "predict")
TRAINING_ONLY = GatedClassifier.training_args()  # arguments a checkpoint may be evaluated with other values of


_JSONARGPARSE_YAML = get_loader("yaml")


def _strict_yaml_load(stream: str, path: str | os.PathLike[str] = "") -> Any:
    """jsonargparse's YAML loader after :func:`dynprune.io.check_yaml`: a key given twice is an error, and a
    syntax error names the config file. jsonargparse reads a config file from inside its folder and passes its
    base name as ``path`` (a command-line value has none)."""
    check_yaml(stream, os.path.abspath(path) if path else "<command-line value>")
    return _JSONARGPARSE_YAML(stream)


class ConfigError(ValueError):
    """A config that cannot mean what it says (conflicts with its checkpoint, no weights to evaluate, ...)."""


def _plain(value: Any) -> Any:
    """A config value as plain JSON data, so config and checkpoint values compare equal when they mean the same."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def hparam_conflicts(config: dict[str, Any], hparams: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (config value, checkpoint value)} for every model argument the two set differently."""
    return {k: (_plain(config[k]), _plain(v)) for k, v in hparams.items()
            if not k.startswith("_") and k in config and _plain(config[k]) != _plain(v)}


def _model_args(config: Namespace) -> Namespace:
    """The model's init arguments (the CLI takes any LightningModule subclass, GatedClassifier by default)."""
    model = config.model
    return model.init_args if isinstance(model, Namespace) and "class_path" in model else model


def _first_logger(trainer: Namespace) -> Any:
    logger = trainer.get("logger")
    return logger[0] if isinstance(logger, list) and logger else logger


def _wandb_under_root(trainer: Namespace) -> None:
    """A WandbLogger left at ``save_dir: .`` writes under ``trainer.default_root_dir`` instead."""
    logger = _first_logger(trainer)
    if (isinstance(logger, Namespace) and logger.class_path.endswith(".WandbLogger")
            and str(logger.init_args.get("save_dir")) == "." and trainer.get("default_root_dir")):
        logger.init_args.save_dir = trainer.default_root_dir


def find_last_checkpoint(config: Namespace) -> tuple[Path | None, str, str | None]:
    """The newest ``last.ckpt`` of the experiment ``config`` describes: ``(path or None, glob searched, run)``,
    ``run`` being the logger's version/id (the run folder's name) when a logger names the folder."""
    trainer, logger = config.trainer, _first_logger(config.trainer)
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    run: str | None = None
    if config.checkpoint.get("dirpath"):
        pattern = glob.escape(str(config.checkpoint.dirpath))
    elif logger is False:
        pattern = glob.escape(str(root / "checkpoints"))
    elif not isinstance(logger, Namespace):  # Lightning's default logger
        pattern = glob.escape(str(root / "lightning_logs")) + "/version_*/checkpoints"
    else:
        args = logger.init_args
        if logger.class_path.endswith(".WandbLogger"):
            project = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
            folder, run = Path(args.get("save_dir") or args.get("dir") or root) / project, args.get("id")
            run = args.get("version") or run
        else:
            version = args.get("version")
            folder = Path(args.get("save_dir") or root) / (args.get("name") or "")
            run = version if isinstance(version, str) or version is None else f"version_{version}"
        pattern = f"{glob.escape(str(folder))}/{glob.escape(run) if run else '*'}/checkpoints"
    pattern = f"{pattern}/{LAST}"
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        return None, pattern, None
    last = Path(found[-1])
    named = isinstance(logger, Namespace) and not config.checkpoint.get("dirpath")
    return last, pattern, last.parent.parent.name if named else None


def _continue_run(logger: Namespace, run: str) -> None:
    """Point ``logger`` at the run folder ``run`` so a resumed fit writes where the interrupted one did."""
    if logger.class_path.endswith(".WandbLogger"):
        logger.init_args.id, logger.init_args.version = run, None
    else:
        match = re.fullmatch(r"version_(\d+)", run)
        logger.init_args.version = int(match.group(1)) if match else run


def _csv_rows_before(path: Path, step: int) -> list[dict[str, str]]:
    """The rows of a CSVLogger ``metrics.csv`` logged before global step ``step`` ([] if there is no file)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("step") and int(float(row["step"])) < step]


class SaveConfigToRunDir(SaveConfigCallback):
    """Save the resolved config atomically to the run's own folder (:func:`dynprune.io.run_dir`, for every
    logger) and next to the checkpoints."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(run_dir(trainer) / self.config_filename, lambda f: f.write(text))
        self.already_saved = trainer.strategy.broadcast(True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(os.path.join(ckpt.dirpath, self.config_filename), lambda f: f.write(text))


class DataModelCheck(L.Callback):
    """Before any loop runs (after the data is set up), the model's ``num_classes`` must match the data's."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
        if num_classes is not None and trainer.datamodule is not None:
            check_num_classes(trainer.datamodule, num_classes)


class DynpruneCLI(LightningCLI):
    """LightningCLI with a FlopsCallback, a CollapseGuard and a last-checkpoint always on, ``--test_after_fit``,
    ``--ckpt_path last`` that resumes the experiment's last run, and explicit checkpoint/config precedence."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.subclass_mode_model:  # any LightningModule (e.g. SlimmableClassifier); GatedClassifier by default
            parser.set_defaults({"model": {"class_path": "dynprune.module.GatedClassifier"}})
        parser.add_lightning_class_args(FlopsCallback, "flops")
        parser.add_lightning_class_args(EpochTimer, "timer")
        parser.add_lightning_class_args(CollapseGuard, "guard")
        parser.add_lightning_class_args(GatedCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/acc",
                             "checkpoint.mode": "max", "checkpoint.filename": "best"})
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                                "init_args": {"project": "dynprune"}}})
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="run `test` on the final weights after `fit` and print the FLOPs report")
        parser.add_argument("--override_checkpoint_hparams", type=bool, default=False,
                            help="with --ckpt_path: let the config's model values win over differing "
                                 "checkpoint hyperparameters (listed in a warning) instead of failing")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="let validate/test/predict run without --ckpt_path or --model.init_from, "
                                 "i.e. on the random initial weights")

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which silently overwrote the config with the checkpoint's hyperparameters:
        resolve ``last``, refuse evaluation without weights, and apply the precedence rules (module docstring)."""
        self._csv_history: list[dict[str, str]] = []
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        _wandb_under_root(config.trainer)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = self._resolve_last(config, sub)
        if sub in EVAL_COMMANDS and not config.get("ckpt_path") and not _model_args(config).get("init_from") \
                and not config.allow_untrained:
            raise ConfigError(f"`dynprune {sub}` needs weights: pass --ckpt_path PATH (or last, or best) or "
                              "--model.init_from PATH; to evaluate the untrained initial weights on purpose, "
                              "pass --allow_untrained true")
        if config.get("ckpt_path") and config.ckpt_path not in ("best", "hpc", "registry"):
            self._check_hparams(config, sub)

    def _resolve_last(self, config: Namespace, sub: str) -> str | None:
        """``--ckpt_path last``: the experiment's newest last.ckpt; a resumed fit continues in that run folder."""
        path, pattern, run = find_last_checkpoint(config)
        if path is None and sub in EVAL_COMMANDS:
            raise ConfigError(f"--ckpt_path last: no checkpoint matches {pattern}")
        if path is None:
            rank_zero_warn(f"--ckpt_path last: no checkpoint matches {pattern}; starting a new run")
            return None
        if sub == "fit" and run is not None:
            _continue_run(_first_logger(config.trainer), run)
            self._csv_history = _csv_rows_before(path.parent.parent / "metrics.csv",
                                                 read_checkpoint(path)["global_step"])
        rank_zero_info(f"--ckpt_path last: {'resuming' if sub == 'fit' else 'loading'} {path}")
        return str(path)

    def _check_hparams(self, config: Namespace, sub: str) -> None:
        path = config.ckpt_path
        hparams = read_checkpoint(path).get("hyper_parameters", {})
        args = _model_args(config)
        conflicts = hparam_conflicts(args.as_dict(), hparams)
        if "backbone" in conflicts:
            ours, theirs = conflicts["backbone"]
            raise ConfigError(f"checkpoint {path} holds a '{theirs}' model but the config's model.backbone is "
                              f"'{ours}'; use a checkpoint of a {ours} run, or set --model.backbone {theirs}")
        blocking = conflicts if sub == "fit" else {k: v for k, v in conflicts.items() if k not in TRAINING_ONLY}
        listing = "; ".join(f"model.{k}: config {ours!r}, checkpoint {theirs!r}"
                            for k, (ours, theirs) in conflicts.items())
        if blocking and not config.override_checkpoint_hparams:
            raise ConfigError(f"the config disagrees with the hyperparameters of checkpoint {path}: {listing}. "
                              "Make them agree (the run's config.yaml holds its values), or pass "
                              "--override_checkpoint_hparams true to use the config's values.")
        if conflicts and config.override_checkpoint_hparams:
            rank_zero_warn(f"--override_checkpoint_hparams: using the config's values, not checkpoint {path}'s: "
                           f"{listing}")
        elif conflicts:
            rank_zero_warn(f"`{sub}` uses the training-only values of checkpoint {path}: {listing}")
            for key, (_, theirs) in conflicts.items():
                args[key] = theirs

    def before_instantiate_classes(self) -> None:
        _wandb_under_root(self._get(self.config, "trainer"))

    def before_fit(self) -> None:
        """A resumed CSVLogger run keeps the rows logged up to its checkpoint (CSVLogger empties metrics.csv)."""
        if self._csv_history and isinstance(self.trainer.logger, CSVLogger) and self.trainer.is_global_zero:
            self.trainer.logger.experiment.metrics[:0] = self._csv_history

    def instantiate_trainer(self, **kwargs: object) -> L.Trainer:
        """Add the data/model check, and a RichProgressBar unless the config disables the bar or brings one."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), DataModelCheck()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Optionally evaluate on the test set right after training (used by the demo)."""
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def cli_main(args: Sequence[str] | None = None) -> DynpruneCLI:
    """Run the LightningCLI on ``args`` (default: ``sys.argv[1:]``)."""
    if "WANDB_SWEEP_ID" not in os.environ:  # a `wandb agent` run reports to its server
        os.environ.setdefault("WANDB_MODE", "offline")
    set_loader("yaml", _strict_yaml_load, exceptions=(yaml.YAMLError,))
    outer = _wandb_run()
    try:
        return DynpruneCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True},
        )
    finally:  # else the next run in this process would log into (and write its folder of) this one
        if _wandb_run() is not None and _wandb_run() is not outer:
            sys.modules["wandb"].finish()


def _wandb_run() -> Any:
    """The active wandb run, if wandb was imported at all."""
    return getattr(sys.modules.get("wandb"), "run", None)


def main(argv: Sequence[str] | None = None) -> None:
    """The LightningCLI commands (``fit|validate|test|predict``); a config or checkpoint error exits with status 2,
    SIGTERM with :data:`PREEMPTED` (Lightning's SIGTERMException would exit 0, as if the run had finished)."""
    try:
        cli_main(argv)
    except (ConfigError, CheckpointError) as err:
        print(f"dynprune: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        print(f"dynprune: stopped by SIGTERM before the run finished (exit status {PREEMPTED}); its last.ckpt holds "
              "the last completed epoch: rerun the same command with --ckpt_path last to resume", file=sys.stderr)
        raise SystemExit(PREEMPTED) from None


if __name__ == "__main__":
    main()
