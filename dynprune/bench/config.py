"""The benchmark's YAML: protocol (data, epochs, seeds, ratios), teacher and the arms, validated so that an
unfair comparison cannot be configured (:class:`FairnessError`), and expanded into :class:`Point` s.

A point is one training run: ``dense_s<seed>`` (the dense model of a seed, also every arm's teacher and
warm start), ``<arm>[+kd]_R<R>_s<seed>`` (an arm at reduction R), ``<arm>[+kd]_s<seed>`` for an arm
that covers every R in one run (a slimmable supernet), or ``dense-<E>ep_s<seed>`` (a dense reference trained E
epochs from scratch: how far the dense model of the protocol is from convergence; no arm starts from it).

Arm kinds: ``static`` (the dense model pruned by a criterion), ``thin`` (a narrower, or with ``scale: depth`` a
shallower, network from scratch), ``slimmable`` (one supernet for every R), ``dynamic`` (learned gates) and
``reduce`` (a training-free token reduction of the dense ViT, ``method: tome`` or ``evit``, fine-tuned for the
extra epochs, or with ``epochs: 0`` not at all).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynprune.data import FASHION_MNIST_DIR
from dynprune.optim import OPTIMIZERS

TOP_KEYS = ("name", "backbone", "protocol", "description", "data", "seeds", "ratios", "epochs", "optim", "kd",
            "flops_tolerance", "min_seeds", "threads", "accelerator", "arms", "dense_reference")
OPTIM_KEYS = ("lr", "finetune_lr", "optimizer", "weight_decay", "gradient_clip")
DATA_KEYS = ("dataset", "data_dir", "train_subset", "val_size", "test_subset", "batch_size", "input_size")
DATASETS = ("fashion_mnist", "digits")
KINDS = ("static", "thin", "dynamic", "slimmable", "reduce")
ARM_KEYS = ("name", "kind", "kd", "start", "epochs", "criterion", "model", "method", "scale", "ratios")
STARTS = ("warm", "scratch")
REDUCE_METHODS = ("tome", "evit")  # dynprune.baselines: ToMe merging, EViT top-k by CLS attention
# What a thin arm shrinks, named after the backbone argument it searches (``width`` -> ``width_mult``): a scale of the
# backbone, not the ``width`` granularity.
SCALES = {arg.removesuffix("_mult"): arg for arg in ("width_mult", "depth_mult")}
# Which kinds can take the shared frozen teacher (a slimmable supernet distils in place, from its own
# largest width, and has no external teacher; a training-free reduce arm trains nothing: Arm.can_distil).
TEACHER_CAPABLE = {"static": True, "thin": True, "dynamic": True, "slimmable": False, "reduce": True}
# Where each kind starts from unless the arm says (static pruning and token reduction start from the dense model).
DEFAULT_START = {"static": "warm", "thin": "scratch", "dynamic": "warm", "slimmable": "scratch", "reduce": "warm"}
BASELINE_KINDS = ("static", "thin", "slimmable", "reduce")
# Point kinds that are a dense network trained from scratch (the protocol's dense model and its longer references):
# no FLOPs target, no budget check, no baseline comparison, nothing to time against themselves.
DENSE_KINDS = ("dense", "reference")
# Arm fields added after results were cached: left out of a point's spec at these defaults, so that the points of
# earlier configs keep their digests (and their finished runs).
LATER_ARM_FIELDS = {"method": "", "scale": "width"}
# Optimiser settings that entered the spec later: left out of it at these defaults (SGD's, for the CNN protocols).
LATER_OPTIM = {"optimizer": "sgd", "weight_decay": 5e-4, "gradient_clip": None}
# DESIGN.md's regimes: a slimmable supernet trains a width for each of them (and for any other R of the
# config), so that adding an R to a config does not retrain it.
REGIMES = (2.0, 4.0, 8.0, 16.0, 32.0)


class BenchConfigError(ValueError):
    """A benchmark YAML that cannot be run as written; the message names the key."""


class FairnessError(BenchConfigError):
    """A comparison the protocol forbids: unequal budgets, a teacher for some arms only, FLOPs off 1/R."""


@dataclass(frozen=True)
class Data:
    """Which data and how it is split: the validation hold-out comes out of the training images."""

    dataset: str = "fashion_mnist"
    data_dir: str = FASHION_MNIST_DIR
    train_subset: int = 0
    val_size: int = 5000
    test_subset: int = 0
    batch_size: int = 128
    input_size: int = 28

    def describe(self) -> str:
        """One line for the table header."""
        if self.dataset == "digits":
            return f"sklearn digits at {self.input_size}x{self.input_size} (60/20/20 train/val/test split per seed)"
        train = self.train_subset or 60000
        val = min(self.val_size, train // 5)
        test = self.test_subset or 10000
        return (f"Fashion-MNIST: first {train} training images, of which {val} held out for validation "
                f"({train - val} train; a seeded split per seed), {test} test images")


@dataclass(frozen=True)
class Arm:
    """One method: ``kind`` + its options; ``kd`` lists the variants run (False: no teacher, True: the
    dense model of the seed as frozen teacher)."""

    name: str
    kind: str
    kd: tuple[bool, ...] = (False,)
    start: str = "warm"
    epochs: int | None = None
    criterion: str = "l1_structured"
    model: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    scale: str = "width"
    ratios: tuple[float, ...] | None = None  # a dynamic recipe explored at some of the config's R only (None: all)

    def runs_at(self, ratio: float) -> bool:
        """Whether the arm has points at ``ratio``."""
        return self.ratios is None or ratio in self.ratios

    @property
    def per_ratio(self) -> bool:
        """Whether the arm trains one run per R (a slimmable supernet covers every R in one run)."""
        return self.kind != "slimmable"

    @property
    def training_free(self) -> bool:
        """A token reduction applied to the dense model and evaluated as it is (``epochs: 0``)."""
        return self.kind == "reduce" and self.epochs == 0

    @property
    def can_distil(self) -> bool:
        """Whether the arm can take the shared frozen teacher (it trains, and its kind takes one)."""
        return TEACHER_CAPABLE[self.kind] and not self.training_free

    def spec(self) -> dict[str, Any]:
        """The arm's fields for a point's spec; those in LATER_ARM_FIELDS only where they differ from the default;
        not ``ratios`` (which R an arm runs at does not change what a point computes)."""
        return {k: v for k, v in asdict(self).items()
                if k != "ratios" and (k not in LATER_ARM_FIELDS or v != LATER_ARM_FIELDS[k])}


@dataclass(frozen=True)
class Point:
    """One training run of the benchmark."""

    arm: str
    kind: str
    seed: int
    ratio: float | None = None
    kd: bool = False

    @property
    def id(self) -> str:
        """Directory-safe run name, e.g. ``static-l1+kd_R4_s0`` or ``dense_s1``."""
        label = f"{self.arm}+kd" if self.kd else self.arm
        ratio = f"_R{self.ratio:g}" if self.ratio is not None else ""
        return f"{label}{ratio}_s{self.seed}"

    @property
    def method(self) -> str:
        """The row label of the table (arm name, ``+kd`` when distilled)."""
        return f"{self.arm}+kd" if self.kd else self.arm


@dataclass(frozen=True)
class BenchConfig:
    """A validated benchmark YAML."""

    name: str
    backbone: str
    protocol: str
    data: Data
    seeds: tuple[int, ...]
    ratios: tuple[float, ...]
    dense_epochs: int
    extra_epochs: int
    arms: tuple[Arm, ...]
    lr: float = 0.1
    finetune_lr: float = 0.02
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    flops_tolerance: float = 0.03
    min_seeds: int = 3
    threads: int = 1
    accelerator: str = "cpu"
    description: str = ""
    path: str = ""
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    gradient_clip: float | None = None
    dense_reference: tuple[int, ...] = ()  # epochs of the dense reference runs (not teachers, not baselines)

    @property
    def total_epochs(self) -> int:
        """The budget of every arm: dense epochs + the extra epochs of a warm-started arm."""
        return self.dense_epochs + self.extra_epochs

    def budget(self, arm: Arm) -> int:
        """The epochs ``arm`` trains in all (the dense ones it starts from included): the budget, or for a
        training-free arm the dense model's epochs."""
        return (self.dense_epochs if arm.start == "warm" else 0) + self.own_epochs(arm)

    def optim_spec(self) -> dict[str, Any]:
        """The optimiser settings that differ from LATER_OPTIM's defaults (shared by every arm and the dense model)."""
        values = {"optimizer": self.optimizer, "weight_decay": self.weight_decay, "gradient_clip": self.gradient_clip}
        return {k: v for k, v in values.items() if v != LATER_OPTIM[k]}

    def arm(self, name: str) -> Arm:
        """The arm called ``name``."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise BenchConfigError(f"unknown arm '{name}'; the config has: {', '.join(a.name for a in self.arms)}")

    def own_epochs(self, arm: Arm) -> int:
        """Epochs the arm's own run trains: the extra epochs after the dense ones, or the whole budget."""
        if arm.epochs is not None:
            return arm.epochs
        return self.extra_epochs if arm.start == "warm" else self.total_epochs

    def points(self) -> list[Point]:
        """Every run, in the order a runner should start them: the dense models first; then per R the arms
        without a teacher before those with one, seed by seed; the arms that cover every R in one run
        (slimmable) after the first R's arms without a teacher."""
        out = [Point("dense", "dense", s) for s in self.seeds]
        out += [Point(reference_name(e), "reference", s) for e in self.dense_reference for s in self.seeds]
        shared = [Point(a.name, a.kind, s, None, kd) for a in self.arms if not a.per_ratio
                  for kd in a.kd for s in self.seeds]
        for i, r in enumerate(self.ratios):
            for kd in (False, True):
                out += [Point(a.name, a.kind, s, r, kd) for s in self.seeds for a in self.arms
                        if a.per_ratio and kd in a.kd and a.runs_at(r)]
                if i == 0 and not kd:
                    out += shared
        return out

    def point(self, point_id: str) -> Point:
        """The point called ``point_id``."""
        for p in self.points():
            if p.id == point_id:
                return p
        raise BenchConfigError(f"unknown point '{point_id}' in {self.path or self.name}; e.g. "
                               f"{', '.join(p.id for p in self.points()[:4])}")

    def spec(self, point: Point) -> dict[str, Any]:
        """Everything that determines a point's result; a cached result is reused only for an equal spec."""
        base = {"backbone": self.backbone, "data": asdict(self.data), "seed": point.seed,
                "dense_epochs": self.dense_epochs, "lr": self.lr, **self.optim_spec()}
        if point.kind == "dense":
            return {"point": point.id, **base}
        if point.kind == "reference":
            return {"point": point.id, **base, "epochs": self.reference_epochs(point)}
        arm = self.arm(point.arm)
        return {"point": point.id, **base, "arm": arm.spec(), "ratio": point.ratio, "kd": point.kd,
                "epochs": self.own_epochs(arm), "finetune_lr": self.finetune_lr,
                "ratios": self.supernet_ratios() if not arm.per_ratio else None,
                "kd_weight": self.kd_weight if point.kd else None,
                "kd_temperature": self.kd_temperature if point.kd else None,
                "flops_tolerance": self.flops_tolerance}

    def reference_epochs(self, point: Point) -> int:
        """The epochs of a dense reference point (``dense-<E>ep``)."""
        for epochs in self.dense_reference:
            if point.arm == reference_name(epochs):
                return epochs
        raise BenchConfigError(f"{point.id} is not a dense reference of {self.path or self.name}")

    def supernet_ratios(self) -> list[float]:
        """The R a slimmable supernet trains a width for: DESIGN.md's regimes and the config's ratios."""
        return sorted(set(REGIMES) | set(self.ratios))

    def digest(self, point: Point) -> str:
        """A short hash of :meth:`spec`."""
        return hashlib.sha256(json.dumps(self.spec(point), sort_keys=True).encode()).hexdigest()[:16]

    def stem(self) -> str:
        """File stem of the outputs: ``bench_<backbone>_<protocol>``."""
        return f"bench_{self.backbone}_{self.protocol}"


def reference_name(epochs: int) -> str:
    """The arm name of the dense reference trained ``epochs`` epochs, e.g. ``dense-14ep``."""
    return f"dense-{epochs}ep"


def _typed(where: str, value: Any, kind: type | tuple[type, ...], positive: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BenchConfigError(f"{where} must be {names}, got {value!r}")
    if positive and value <= 0:
        raise BenchConfigError(f"{where} must be > 0, got {value!r}")
    return value


def _unknown(where: str, got: dict[str, Any], allowed: tuple[str, ...]) -> None:
    bad = sorted(set(got) - set(allowed))
    if bad:
        raise BenchConfigError(f"unknown key(s) {bad} in {where}; allowed: {', '.join(allowed)}")


def _arm(i: int, raw: Any) -> Arm:
    where = f"arms[{i}]"
    if not isinstance(raw, dict):
        raise BenchConfigError(f"{where} must be a mapping with name and kind, got {raw!r}")
    _unknown(where, raw, ARM_KEYS)
    name = _typed(f"{where}.name", raw.get("name"), str)
    if not name or not all(c.isalnum() or c in "-." for c in name):
        raise BenchConfigError(f"{where}.name {name!r} must be letters, digits, '-' and '.' (it names runs)")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise BenchConfigError(f"unknown kind {kind!r} in {where}; choose one of: {', '.join(KINDS)}")
    kd = raw.get("kd", [False])
    kd = [kd] if isinstance(kd, bool) else kd
    if not isinstance(kd, list) or not kd or not all(isinstance(k, bool) for k in kd) or len(set(kd)) < len(kd):
        raise BenchConfigError(f"{where}.kd must be true, false or [false, true], got {raw.get('kd')!r}")
    start = raw.get("start", DEFAULT_START[kind])
    if start not in STARTS:
        raise BenchConfigError(f"{where}.start must be one of: {', '.join(STARTS)}; got {start!r}")
    if kind == "static" and start != "warm":
        raise BenchConfigError(f"{where}: static pruning prunes the dense model (start: warm), got start: {start}")
    if kind in ("thin", "slimmable") and start != "scratch":
        raise BenchConfigError(f"{where}: a {kind} network is trained from scratch (start: scratch), got {start}")
    if kind == "reduce" and start != "warm":
        raise BenchConfigError(f"{where}: token reduction reduces the dense model (start: warm), got start: {start}")
    epochs = raw.get("epochs")
    if epochs is not None and not (kind == "reduce" and epochs == 0):
        _typed(f"{where}.epochs", epochs, int, positive=True)
    method = raw.get("method", LATER_ARM_FIELDS["method"])
    if (kind == "reduce") != (method in REDUCE_METHODS):
        raise BenchConfigError(f"{where}.method {method!r}: a reduce arm needs method, one of: "
                               f"{', '.join(REDUCE_METHODS)}; other kinds take none")
    scale = raw.get("scale", LATER_ARM_FIELDS["scale"])
    if scale not in SCALES or (kind != "thin" and "scale" in raw):
        raise BenchConfigError(f"{where}.scale {scale!r}: a thin arm shrinks one of: {', '.join(SCALES)}; other "
                               "kinds take no scale")
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise BenchConfigError(f"{where}.model must be a mapping of GatedClassifier arguments, got {model!r}")
    if kind == "reduce" and model:
        raise BenchConfigError(f"{where}.model {model!r}: a reduce arm's schedule is chosen by the harness to match "
                               "1/R; it takes no model options")
    if kind == "dynamic" and not model.get("gate"):
        raise BenchConfigError(f"{where}: a dynamic arm needs model.gate (e.g. sigmoid)")
    reserved = sorted(set(model) & {"target", "init_from", "teacher", "distill", "lr", "backbone", "width_mult"})
    if reserved:
        raise BenchConfigError(f"{where}.model sets {reserved}, which the harness owns (target = 1/R, the teacher, "
                               "the warm start, lr and the width are part of the protocol)")
    criterion = raw.get("criterion", "l1_structured")
    if kind == "static":
        from dynprune.static import list_criteria

        if criterion not in list_criteria():
            raise BenchConfigError(f"unknown static criterion {criterion!r} in {where}; choose one of: "
                                   f"{', '.join(list_criteria())}")
    ratios = raw.get("ratios")
    if ratios is not None:
        if kind != "dynamic":
            raise BenchConfigError(f"{where}.ratios: only a dynamic recipe may run at some R only; every baseline "
                                   f"({', '.join(BASELINE_KINDS)}) runs at every R, so the strongest baseline is "
                                   "defined at each")
        if not isinstance(ratios, list) or not ratios or not all(isinstance(r, int | float) for r in ratios):
            raise BenchConfigError(f"{where}.ratios must be a non-empty list of the config's ratios, got {ratios!r}")
        ratios = tuple(float(r) for r in ratios)
    return Arm(name, kind, tuple(kd), start, epochs, criterion, dict(model), method, scale, ratios)


def check_fairness(cfg: BenchConfig) -> None:
    """Raise :class:`FairnessError` unless the configured arms are comparable: equal total epochs, the
    teacher given to every teacher-capable arm in +/- KD pairs or to none, distinct names, >= 1 seed. A
    training-free arm (fewer epochs) runs only beside a fine-tuned arm of its method at the full budget, so
    that the strongest baseline is never an under-trained one."""
    names = [a.name for a in cfg.arms]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({"dense"} & set(names)))
    if dupes:
        raise FairnessError(f"arm names must be unique and not 'dense' (the dense model is always run): {dupes}")
    for arm in cfg.arms:
        warm = cfg.dense_epochs if arm.start == "warm" else 0
        total = cfg.budget(arm)
        if arm.training_free:
            if not any(a.kind == "reduce" and a.method == arm.method and cfg.budget(a) == cfg.total_epochs
                       for a in cfg.arms):
                raise FairnessError(f"arm '{arm.name}' is training-free ({total} epochs in all, under the budget of "
                                    f"{cfg.total_epochs}): add a reduce arm with method {arm.method} fine-tuned for "
                                    f"the {cfg.extra_epochs} extra epochs beside it, so the strongest baseline is "
                                    "never an under-trained one")
        elif total != cfg.total_epochs:
            raise FairnessError(f"arm '{arm.name}' trains {total} epochs in all ({warm} dense + "
                                f"{cfg.own_epochs(arm)} of its own), but the budget is dense {cfg.dense_epochs} + "
                                f"{cfg.extra_epochs} = {cfg.total_epochs} for every arm")
        if True in arm.kd and not arm.can_distil:
            raise FairnessError(f"arm '{arm.name}' ({arm.kind}{', training-free' if arm.training_free else ''}) "
                                "cannot take the dense teacher; set kd: false")
    if any(True in a.kd for a in cfg.arms):
        unpaired = [a.name for a in cfg.arms if a.can_distil and set(a.kd) != {False, True}]
        if unpaired:
            raise FairnessError(f"some arm distils from the dense teacher, so every arm that can distil must run "
                                f"with and without it (kd: [false, true]); not paired: {', '.join(unpaired)}")


def load_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Read and validate a benchmark YAML (configs/bench/*.yaml); errors name the key and the allowed values."""
    path = Path(path)
    if not path.is_file():
        raise BenchConfigError(f"benchmark config {path} not found")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise BenchConfigError(f"{path} must hold a mapping (name, backbone, data, seeds, ratios, epochs, arms)")
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], path: str = "") -> BenchConfig:
    """Validate a benchmark config given as a mapping (see :func:`load_config`)."""
    _unknown("the benchmark config", raw, TOP_KEYS)
    for key in ("name", "backbone", "seeds", "ratios", "epochs", "arms"):
        if key not in raw:
            raise BenchConfigError(f"the benchmark config needs '{key}'")
    data_raw = raw.get("data", {})
    _unknown("data", data_raw, DATA_KEYS)
    data = Data(**data_raw)
    if data.dataset not in DATASETS:
        raise BenchConfigError(f"unknown data.dataset {data.dataset!r}; choose one of: {', '.join(DATASETS)}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) < len(seeds):
        raise BenchConfigError(f"seeds must be a list of distinct integers >= 0, got {seeds!r}")
    ratios = raw["ratios"]
    if not isinstance(ratios, list) or not ratios or not all(isinstance(r, int | float) and r > 1 for r in ratios):
        raise BenchConfigError(f"ratios must be a list of FLOPs reductions > 1 (e.g. [4, 16]), got {ratios!r}")
    epochs = raw["epochs"]
    if not isinstance(epochs, dict) or set(epochs) != {"dense", "extra"}:
        raise BenchConfigError(f"epochs must be {{dense: D, extra: N}} (warm-started arms train N more, the others "
                               f"D + N), got {epochs!r}")
    optim = raw.get("optim", {})
    _unknown("optim", optim, OPTIM_KEYS)
    optimizer = optim.get("optimizer", LATER_OPTIM["optimizer"])
    if optimizer not in OPTIMIZERS:
        raise BenchConfigError(f"unknown optim.optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    weight_decay = _typed("optim.weight_decay", optim.get("weight_decay", LATER_OPTIM["weight_decay"]), float)
    if weight_decay < 0:
        raise BenchConfigError(f"optim.weight_decay must be >= 0, got {weight_decay!r}")
    clip = optim.get("gradient_clip")
    if clip is not None:
        _typed("optim.gradient_clip", clip, float, positive=True)
    kd = raw.get("kd", {})
    _unknown("kd", kd, ("weight", "temperature"))
    arms_raw = raw["arms"]
    if not isinstance(arms_raw, list) or not arms_raw:
        raise BenchConfigError("arms must be a non-empty list")
    accelerator = raw.get("accelerator", "cpu")
    if accelerator not in ("cpu", "gpu", "auto"):
        raise BenchConfigError(f"accelerator must be cpu, gpu or auto, got {accelerator!r}")
    tolerance = _typed("flops_tolerance", raw.get("flops_tolerance", 0.03), float, positive=True)
    if tolerance > 0.03:
        raise FairnessError(f"flops_tolerance {tolerance} is looser than the protocol's 3% (relative)")
    reference = raw.get("dense_reference", [])
    if not isinstance(reference, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e > 0
                                                  for e in reference) or len(set(reference)) < len(reference):
        raise BenchConfigError(f"dense_reference must be a list of distinct epoch counts > 0 (dense models trained "
                               f"that long from scratch, e.g. [7, 14]), got {reference!r}")
    name = _typed("name", raw["name"], str)
    protocol = _typed("protocol", raw.get("protocol", name), str)
    cfg = BenchConfig(
        name=name, backbone=_typed("backbone", raw["backbone"], str), protocol=protocol, data=data,
        seeds=tuple(seeds), ratios=tuple(float(r) for r in ratios),
        dense_epochs=_typed("epochs.dense", epochs["dense"], int, positive=True),
        extra_epochs=_typed("epochs.extra", epochs["extra"], int, positive=True),
        arms=tuple(_arm(i, a) for i, a in enumerate(arms_raw)),
        lr=_typed("optim.lr", optim.get("lr", 0.1), float, positive=True),
        finetune_lr=_typed("optim.finetune_lr", optim.get("finetune_lr", 0.02), float, positive=True),
        kd_weight=_typed("kd.weight", kd.get("weight", 1.0), float, positive=True),
        kd_temperature=_typed("kd.temperature", kd.get("temperature", 4.0), float, positive=True),
        flops_tolerance=tolerance, min_seeds=_typed("min_seeds", raw.get("min_seeds", 3), int, positive=True),
        threads=_typed("threads", raw.get("threads", 1), int, positive=True), accelerator=accelerator,
        description=str(raw.get("description", "")), path=path, optimizer=optimizer,
        weight_decay=weight_decay, gradient_clip=clip, dense_reference=tuple(reference))
    for arm in cfg.arms:
        extra = sorted(set(arm.ratios or ()) - set(cfg.ratios))
        if extra:
            raise BenchConfigError(f"arm '{arm.name}' ratios {extra} are not among the config's ratios "
                                   f"{list(cfg.ratios)}")
    if cfg.min_seeds < 3:
        raise FairnessError(f"min_seeds {cfg.min_seeds}: a headline row needs >= 3 seeds (fewer seeds only mark "
                            "rows as not headline-valid; do not lower min_seeds)")
    check_fairness(cfg)
    _check_reducible(cfg)
    return cfg


def _check_reducible(cfg: BenchConfig) -> None:
    """A reduce arm needs a backbone that dynprune's token reductions wrap (its ViT)."""
    reduce = [a.name for a in cfg.arms if a.kind == "reduce"]
    if not reduce:
        return
    from dynprune import backbones
    from dynprune.backbones.vit import VisionTransformer

    model = backbones.create(cfg.backbone, num_classes=10, in_chans=1, input_size=cfg.data.input_size)
    if not isinstance(model, VisionTransformer):
        raise BenchConfigError(f"reduce arm(s) {reduce} reduce the tokens of dynprune's ViT; backbone "
                               f"{cfg.backbone!r} is a {type(model).__name__}")
