"""Reading checkpoints safely, where a run's outputs go, and atomic file outputs: write to a temp file in the
same folder, then rename over the target (the file gets the umask's permissions, like any other file the run
writes)."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    import lightning as L


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not a Lightning checkpoint; names the file."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; a missing, truncated or foreign file is a
    CheckpointError naming it (never advising an unsafe load)."""
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).rglob("*.ckpt"))
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file; pass a .ckpt file "
                              + (f"in it: {', '.join(found[:5])}" if found else "(it holds none)"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, unpickling and OS errors: the reasons a file is not a checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f" ({type(err).__name__}: {first})" if first and "weights_only" not in first else ""
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch "
                              f"checkpoint{reason}. Checkpoints are loaded as weights only; use a last.ckpt/best.ckpt "
                              "written by dynprune (an interrupted write leaves the previous file intact).") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict'); for a plain state_dict of a "
                              "dense backbone use --model.init_from")
    return ckpt


def check_yaml(text: str, name: str) -> None:
    """Parse ``text`` as one YAML document and refuse a key given twice in one mapping (PyYAML would keep the
    last one silently). Errors are ``yaml.YAMLError`` whose marks name ``name`` (the file path), line and column."""
    stream = io.StringIO(text)
    stream.name = name  # PyYAML names a string stream "<unicode string>" in its errors
    pending, seen = [yaml.compose(stream, Loader=yaml.SafeLoader)], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:  # an empty document, or an alias of a node already checked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, yaml.Mark] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in first:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark,
                            f"duplicate key '{key.value}' (first given on line {first[key.value].line + 1})",
                            key.start_mark)
                    first[key.value] = key.start_mark
            pending += [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Load a YAML file safely after :func:`check_yaml`: a duplicate key or a syntax error names the file."""
    text = Path(path).read_text()
    check_yaml(text, str(path))
    return yaml.safe_load(text)


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of a run's outputs: ``<save_dir>/<name>/<version>`` of the first logger (the folder that
    ModelCheckpoint puts ``checkpoints/`` in, unique per run for every logger), else ``default_root_dir``."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if logger.version is None and hasattr(logger, "experiment"):
        logger.experiment  # noqa: B018 (a wandb run gets its id when it starts)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True))


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically write dict rows as CSV; columns are the union of keys in first-seen order."""
    rows = list(rows)
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def write(f: IO[str]) -> None:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write)


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically save a matplotlib figure as PNG."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), "wb")


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table of ``rows`` (columns of the first row; floats to 4 significant digits)."""
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], stem: str | os.PathLike[str], title: str = "") -> tuple[Path, Path]:
    """Atomically write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` (with an optional ``# title``)."""
    md = (f"# {title}\n\n" if title else "") + to_markdown(rows)
    return write_csv(f"{stem}.csv", rows), atomic_write(f"{stem}.md", lambda f: f.write(md))
