"""mkdocs hook: publish ``experiments/results/`` as ``results/`` pages of the site, read at build time, so that the
site never holds a stale copy of a table.

- Every ``*.md`` and ``*.png`` there becomes ``results/<name>`` (not in the navigation; pages link to them).
- ``extra.results.expected`` lists results files that pages link to before the scripts have written them
  (a fresh checkout, a run still going): each gets a page saying so and naming the command that writes it.
- ``extra.results.notes`` maps filename patterns to a warning shown at the top of the matching pages
  (e.g. a comparison found unfair).
- The marker ``<!-- results-index -->`` in a page is replaced by a table of every results file: its first line
  (which names the device and the protocol) and its note.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
PREFIX = "results/"
MARKER = "<!-- results-index -->"
LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def _settings(config: MkDocsConfig) -> dict[str, Any]:
    """The ``extra.results`` section of mkdocs.yml."""
    return config.extra.get("results", {})


def _note(name: str, notes: dict[str, str]) -> str | None:
    """The note of the first pattern that matches file ``name`` (None: no note)."""
    return next((text for pattern, text in notes.items() if fnmatch.fnmatch(name, pattern)), None)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the results folder's tables and plots, and a placeholder for each expected file not written yet."""
    present = sorted(p for p in RESULTS.iterdir() if p.suffix in (".md", ".png"))
    for path in present:
        files.append(File.generated(config, PREFIX + path.name, abs_src_path=str(path),
                                    inclusion=InclusionLevel.NOT_IN_NAV))
    for name, command in _settings(config).get("expected", {}).items():
        if not (RESULTS / name).exists():
            text = (f"# {name}: not written yet\n\nThis checkout has no `experiments/results/{name}`. "
                    f"It is written by:\n\n    {command}\n")
            files.append(File.generated(config, PREFIX + name, content=text, inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def _first_line(path: Path) -> str:
    """The file's first non-empty line as plain text (links and images reduced to their text), shortened."""
    line = next((ln.strip() for ln in path.read_text().splitlines() if ln.strip()), "")
    line = LINK.sub(r"\1", line).lstrip("#! ").replace("|", "\\|")
    return line if len(line) <= 240 else line[:240].rsplit(" ", 1)[0] + " …"


def _index(page: Page) -> str:
    """A Markdown table of every results file, linked relative to ``page``."""
    up = "../" * page.file.src_uri.count("/")
    rows = ["| file | first line (what, where, how) |", "|---|---|"]
    for path in sorted(RESULTS.glob("*.md")):
        rows.append(f"| [{path.name}]({up}{PREFIX}{path.name}) | {_first_line(path)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Expand the results index marker; put each results page's note above it."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _index(page))
    name = page.file.src_uri.removeprefix(PREFIX)
    if page.file.src_uri.startswith(PREFIX) and (note := _note(name, _settings(config).get("notes", {}))):
        markdown = f'!!! warning "Read with care"\n    {note}\n\n{markdown}'
    return markdown
