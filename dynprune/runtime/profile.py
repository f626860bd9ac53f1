"""A latency lookup table of a gated model, measured through the compiled runtime on the machine at hand
(LAUDNet's idea: price decisions by what they save in time, not in FLOPs).

For each site, :func:`profile_latency` times the site's *scope* (the smallest module holding the site's module
and every layer its decisions change: a channel site's block, a gated block itself) inside the compiled model
(thin path), on the input that scope receives, with the site's decisions forced to keep the first k units for a
grid of k (0, 1, the given fractions, all; a block: skipped or executed) and every other site keeping everything.
It also times the whole model with every unit kept on the masked path (the dense folded compute, plus the gates):
``full_ms``.

The table predicts an input's latency from its decisions (N, units) per site, with f_s the mean decision:
``full_ms + sum_s g_s * (t_s(f_s * units) - t_s(units))``, t_s piecewise-linear in the kept count between the
measured points (differentiable in the decisions, as the FLOPs terms are) and g_s the product of the mean
decisions of the sites whose module encloses site s (a skipped block removes what its inner sites would save).
:meth:`LatencyTable.cost` is that latency over ``full_ms``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from dynprune.runtime.compile import CompiledModel, _check_inputs, compile_for_inference

if TYPE_CHECKING:
    from dynprune.inject import GatingInfo

FORMAT = 1


@dataclass
class SiteCurve:
    """One site's measured scope latency (ms per call) at each kept count of its ``units`` decisions."""

    scope: str
    units: int
    kept: list[int]
    ms: list[float]

    def at(self, kept: Tensor) -> Tensor:
        """Latency (ms) at continuous kept counts (N,), linear between measured points; differentiable."""
        xs = torch.tensor(self.kept, dtype=kept.dtype, device=kept.device)
        ys = torch.tensor(self.ms, dtype=kept.dtype, device=kept.device)
        hi = torch.searchsorted(xs, kept.detach().contiguous()).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
        return y0 + (kept - x0) * (y1 - y0) / (x1 - x0)


@dataclass
class LatencyTable:
    """Per-site latency curves of one gated model on one machine, batch size and thread count."""

    model: str
    input_shape: list[int]
    batch: int
    threads: int
    machine: str
    full_ms: float
    sites: dict[str, SiteCurve]
    format: int = FORMAT
    enclosing: dict[str, list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.enclosing = {name: [outer for outer in self.sites if name.startswith(outer + ".")] for name in self.sites}

    def predict(self, masks: dict[str, Tensor]) -> Tensor:
        """Predicted milliseconds per input (N,) from the decisions {site: (N, units)}."""
        return self.full_ms + sum(self.site_deltas(masks).values())

    def cost(self, masks: dict[str, Tensor]) -> Tensor:
        """Predicted latency over the latency with every unit kept, per input (N,); differentiable."""
        return self.predict(masks) / self.full_ms

    def site_deltas(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """{site: change of latency in ms (N,) its decisions make}, scaled by the enclosing sites' decisions."""
        self.check_masks(masks)
        out = {}
        for name, curve in self.sites.items():
            m = masks[name]
            kept = m.flatten(1).mean(1) * curve.units
            delta = curve.at(kept) - curve.ms[-1]
            for outer in self.enclosing[name]:
                delta = delta * masks[outer].flatten(1).mean(1)
            out[name] = delta
        return out

    def site_costs(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each site's own predicted latency share per input {site: (N,)}: its scope's latency at its decisions
        over ``full_ms`` (the per-site credit of a REINFORCE gate)."""
        deltas = self.site_deltas(masks)
        return {name: (self.sites[name].ms[-1] + deltas[name]) / self.full_ms for name in self.sites}

    def check_masks(self, masks: dict[str, Tensor]) -> None:
        """ValueError unless ``masks`` has exactly this table's sites with their unit counts."""
        if set(masks) != set(self.sites):
            raise ValueError(f"the latency table was profiled for sites {_diff(set(self.sites), set(masks))}")
        for name, m in masks.items():
            if m.shape[-1] != self.sites[name].units:
                raise ValueError(f"site '{name}' decides {m.shape[-1]} units; the latency table has "
                                 f"{self.sites[name].units}")

    def check(self, model: nn.Module) -> None:
        """ValueError naming what differs unless this table was profiled for ``model``'s sites and input shape."""
        info = model.dynprune
        units = {name: site.units for name, site in info.sites.items()}
        if set(units) != set(self.sites):
            raise ValueError(f"the latency table (for a {self.model}) was profiled for sites "
                             f"{_diff(set(self.sites), set(units))}: profile this model "
                             "(dynprune profile-latency, or latency_table: null to profile at fit start)")
        wrong = {n: (u, self.sites[n].units) for n, u in units.items() if u != self.sites[n].units}
        if wrong:
            raise ValueError(f"sites {sorted(wrong)} decide {[w[0] for w in wrong.values()]} units; the latency "
                             f"table has {[w[1] for w in wrong.values()]}")
        if list(info.flops.input_shape) != self.input_shape:
            raise ValueError(f"the latency table was profiled at input shape {self.input_shape}, the model takes "
                             f"{list(info.flops.input_shape)}")

    def rows(self) -> list[dict[str, Any]]:
        """One row per (site, kept count): site, scope, units, kept, kept_fraction, ms."""
        return [{"site": name, "scope": c.scope, "units": c.units, "kept": k, "kept_fraction": k / c.units, "ms": ms}
                for name, c in self.sites.items() for k, ms in zip(c.kept, c.ms, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able; what :meth:`save` writes and a checkpoint keeps)."""
        return {k: v for k, v in asdict(self).items() if k != "enclosing"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the data") -> LatencyTable:
        """The table :meth:`to_dict` gave; ValueError naming ``source`` if it is not one."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            table = cls(**{**data, "sites": {name: SiteCurve(**c) for name, c in data["sites"].items()}})
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{source} is not a dynprune latency table: {err}") from err
        for name, c in table.sites.items():
            if len(c.kept) < 2 or c.kept != sorted(set(c.kept)) or len(c.ms) != len(c.kept) or c.kept[-1] != c.units:
                raise ValueError(f"{source}: site '{name}' needs >= 2 increasing kept counts ending at its "
                                 f"{c.units} units, one latency each; got kept={c.kept}, ms={c.ms}")
        return table

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as JSON (and the rows as CSV beside it)."""
        from dynprune.io import write_csv, write_json

        write_csv(Path(path).with_suffix(".csv"), self.rows())
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read a table written by :meth:`save`; FileNotFoundError / ValueError say what is missing or wrong."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table '{path}' does not exist: make it with `dynprune profile-latency "
                                    "--config <fit config> --out <file>.json`, or set latency_table: null to profile "
                                    "at fit start")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"'{path}' is not a dynprune latency table: {err}") from err
        return cls.from_dict(data if isinstance(data, dict) else {}, f"'{path}'")


def _diff(expected: set[str], given: set[str]) -> str:
    """What a set of site names lacks and has extra."""
    return f"{sorted(expected)}; missing here: {sorted(expected - given)}, not in the table: {sorted(given - expected)}"


def machine() -> str:
    """CPU model, core count and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, nproc={os.cpu_count()}, torch {torch.__version__}"


def _scope(paths: Sequence[str]) -> str:
    """The longest common dotted module prefix of ``paths`` ('' : the whole model)."""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _grid(units: int, fractions: Sequence[float]) -> list[int]:
    """Kept counts for ``fractions`` of ``units``, with 0, 1 and ``units``, sorted and unique: 0 kept skips the
    layer's call altogether while 1 kept pays its whole fixed cost, so the curve must not interpolate across."""
    return sorted({0, min(1, units), units, *(round(f * units) for f in fractions)})


@torch.no_grad()
def profile_latency(
    model: nn.Module, input_shape: Sequence[int] | None = None, batch: int = 1,
    fractions: Sequence[float] = (0.25, 0.5, 0.75), rounds: int = 5, target_s: float = 0.005,
    threads: int | None = None,
) -> LatencyTable:
    """A :class:`LatencyTable` of a gated ``model`` (left unchanged), measured through the compiled runtime.

    ``input_shape`` (C, H, W) defaults to the shape ``gate_model`` traced; ``batch``: inputs per timed call;
    ``fractions``: kept fractions of each site's units timed besides none, one unit and all (a block: executed or
    not);
    ``rounds`` interleaved rounds of ``torch.utils.benchmark`` blocks of about ``target_s`` seconds each, the
    median kept; ``threads``: torch threads while timing (default: the current count).
    """
    info = getattr(model, "dynprune", None)
    if info is None:
        raise ValueError("profile_latency needs a model gated by dynprune.gate_model; this one has no gates")
    if batch < 1 or rounds < 1:
        raise ValueError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}")
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"fractions are kept fractions strictly between 0 and 1 (none, one unit and all are always "
                         f"timed), got {bad}")
    per_position = [n for n, s in info.sites.items() if s.layout.per_position]
    if per_position:
        raise NotImplementedError(f"profile_latency times one decision set per input; sites {per_position} decide "
                                  "per position")
    shape = tuple(input_shape or info.flops.input_shape)
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled = compile_for_inference(copy.deepcopy(model), shape, dispatch=())
        param = next(model.parameters())
        x = _check_inputs(model, shape, batch, param.device)  # floats, or token ids for a model of token ids
        x = x.to(param.dtype) if x.is_floating_point() else x
        return _measure(compiled, info, x, fractions, rounds, target_s, threads)
    finally:
        torch.set_num_threads(previous)


def _measure(compiled: CompiledModel, info: GatingInfo, x: Tensor, fractions: Sequence[float], rounds: int,
             target_s: float, threads: int) -> LatencyTable:
    """Capture each scope's input with every unit kept, then time the grid in interleaved rounds."""
    gates = compiled.site_gates
    dtype = next(compiled.parameters()).dtype
    full = {name: torch.ones(site.units, dtype=dtype, device=x.device) for name, site in info.sites.items()}
    for name, gate in gates.items():
        gate.force(full[name])
    scopes = {name: _scope([name, *info.flops.dependents.get(name, [])]) for name in info.sites}
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def capture(path: str):  # noqa: ANN202 (a hook factory)
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.setdefault(path, (args, kwargs))
        return hook

    handles = [compiled.net.get_submodule(s).register_forward_pre_hook(capture(s), with_kwargs=True)
               for s in set(scopes.values()) if s]
    try:
        compiled.pin("thin")(x)
    finally:
        for h in handles:
            h.remove()
    clock = time.process_time if threads == 1 else time.perf_counter
    points: list[tuple[str, int]] = [(n, k) for n, s in info.sites.items() for k in _grid(s.units, fractions)]
    timers: dict[tuple[str, int], benchmark.Timer] = {}
    for name, k in points:
        scope = scopes[name]
        module = compiled.net.get_submodule(scope) if scope else compiled.net
        args, kwargs = captured.get(scope, ((x,), {}))
        timers[(name, k)] = benchmark.Timer("with torch.inference_mode(): f(*a, **kw)", timer=clock,
                                            globals={"f": module, "a": args, "kw": kwargs, "torch": torch},
                                            num_threads=threads)
    timers[("", 0)] = benchmark.Timer("f(x)", globals={"f": compiled.pin("masked"), "x": x}, num_threads=threads,
                                      timer=clock)
    keys = [*timers]
    prefix = {name: torch.arange(s.units, device=x.device) for name, s in info.sites.items()}

    def force(key: tuple[str, int]) -> None:
        name, k = key
        compiled.switch("thin" if name else "masked")
        for other, gate in gates.items():
            gate.force(full[other])
        if name:
            gates[name].force((prefix[name] < k).to(dtype))

    numbers = {}
    for key in keys:
        force(key)
        timers[key].timeit(2)  # warm: packed weights cached
        numbers[key] = max(1, int(target_s / max(timers[key].timeit(1).median, 1e-6)))
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    for _ in range(rounds):
        for key in keys:
            force(key)
            samples[key].append(timers[key].timeit(numbers[key]).median)
    for gate in gates.values():
        gate.force(None)
    ms = {key: 1e3 * statistics.median(s) for key, s in samples.items()}
    curves = {}
    for name, group in itertools.groupby(points, key=lambda p: p[0]):
        kept = [k for _, k in group]
        curves[name] = SiteCurve(scopes[name], info.sites[name].units, kept, [ms[(name, k)] for k in kept])
    return LatencyTable(type(compiled.net).__name__, list(x.shape[1:]), len(x), threads, machine(), ms[("", 0)],
                        curves)
