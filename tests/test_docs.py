"""The documentation is checked like code: every fenced block of README.md and docs/ runs, and the site builds.

- ``python`` blocks of one page run in order in one namespace (as in a notebook), in a temporary folder of the
  page's own. One interpreter runs every page, each in a fresh namespace, so torch and Lightning are imported
  once. A block with ``title="name.py"`` is written to that file instead (a module the later blocks import), as
  is a ``yaml`` block with a title (a config the page's shell lines use).
- ``bash`` blocks: each command runs in a safe form (:func:`safe_form`): the ``dynprune`` CLI with
  ``--print_config`` (the whole config is parsed and validated), ``bench`` with ``--dry-run`` (its YAML is
  validated) and other subcommands with ``--help``, scripts with ``--help``, ``make``
  as a dry run (``make -n``), shell scripts with ``bash -n``, ``pip install -e .[extra]`` as a check that the
  extras exist. A command with no safe form fails the test, so that a new kind of command needs a rule here.
- ``mkdocs build --strict`` builds the site into a temporary folder (broken links and references fail).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]+)"')
LINKED = ("configs", "experiments")  # shell lines name repository paths; the temporary folder links them
CLI_COMMANDS = ("fit", "validate", "test", "predict")
RUNNER = textwrap.dedent("""
    # One process runs every page: each page in its own folder and a fresh namespace (imports are shared).
    import contextlib, io, json, os, runpy, sys, traceback
    import torch
    torch.set_num_threads(1)
    pages, out_path = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for page, job in pages.items():
        os.chdir(job["dir"])
        sys.path.insert(0, job["dir"])
        scope, failure, codes = {"__name__": "__main__"}, None, []
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            for where, body in job["python"]:
                try:
                    exec(compile(body, where, "exec"), scope)
                except BaseException:
                    failure = traceback.format_exc()
                    break
            for kind, argv in job["cli"]:
                before = log.tell()
                try:
                    if kind == "dynprune":
                        from dynprune.entry import main
                        main(argv)
                    else:
                        sys.argv = argv
                        runpy.run_path(argv[0], run_name="__main__")
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
                except BaseException:
                    code = traceback.format_exc()
                codes.append((code, log.getvalue()[before:][-3000:]))
        sys.path.remove(job["dir"])
        results[page] = {"python": failure, "cli": codes}
    json.dump(results, open(out_path, "w"))
""")


@dataclass
class Block:
    """One fenced code block: its page, first line number, language, optional title and text."""

    page: Path
    line: int
    lang: str
    title: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, in order (indented blocks of admonitions and lists included)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        info = match["info"].strip()
        lang = info.split(" ", 1)[0].strip("{}.")
        title = TITLE.search(info)
        body = textwrap.dedent(match["body"]) if match["indent"] else match["body"]
        found.append(Block(page, text.count("\n", 0, match.start()) + 2, lang, title and title[1], body))
    return found


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return [cmd for line in joined.splitlines() if (cmd := line.split(" #", 1)[0].strip()) and not cmd.startswith("#")]


def safe_form(command: str) -> tuple[str, list[str]]:
    """(runner, argv) that checks ``command`` without its side effects; ValueError when there is no rule.

    Runners: ``dynprune`` (the CLI, in one shared process), ``script`` (a Python script, same process),
    ``make`` (a dry run), ``bash`` (a shell script, syntax-checked with ``bash -n``), ``extras`` (the argv are
    extras that setup.cfg must define).
    """
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        raise ValueError(f"empty command: {command!r}")
    head, args = Path(words[0]).name, words[1:]
    if head in ("python", "python3") and args[:2] == ["-m", "dynprune"]:
        head, args = "dynprune", args[2:]
    if head == "dynprune":
        if args and args[0] in CLI_COMMANDS:
            return "dynprune", [*args, "--print_config"]
        if args[:1] == ["bench"] and len(args) > 1:  # validates the benchmark YAML (fairness included), runs nothing
            return "dynprune", ["bench", args[1], "--dry-run", "--root", "bench_dry_run"]
        return "dynprune", [*args, "--help"]
    if head in ("python", "python3") and args and args[0].endswith(".py"):
        check = "--print_config" if args[1:2] and args[1] in CLI_COMMANDS else "--help"  # a script wrapping the CLI
        return "script", [*args, check]
    if head == "make":
        return "make", args
    if head == "bash" and len(args) == 1 and args[0].endswith(".sh"):
        return "bash", args
    if head == "pip" and args[:2] == ["install", "-e"] and len(args) == 3:
        extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[2])
        if extras:
            return "extras", (extras[1] or "").split(",") if extras[1] else []
    raise ValueError(f"no safe form for the shell command {command!r}; add a rule to tests/test_docs.py::safe_form")


def check_paths(command: str, cwd: Path) -> None:
    """Every file a command reads (a config, a script: a positional argument or a ``--config`` value) exists;
    the values of other options may be outputs."""
    words = shlex.split(command)
    for before, word in zip(["", *words[:-1]], words, strict=True):
        if before.startswith("--") and before != "--config":
            continue
        if re.fullmatch(r"[\w./-]+\.(ya?ml|py)", word) and not (cwd / word).exists():
            raise AssertionError(f"`{command}` names {word}, which does not exist")


def materialise(blocks: list[Block], where: Path) -> None:
    """Write the titled blocks (modules, configs) of a page into ``where``, and link the repository's folders."""
    for name in LINKED:
        (where / name).symlink_to(ROOT / name)
    for block in blocks:
        if block.title:
            (where / block.title).write_text(block.body)


def page_job(page: Path, where: Path) -> dict[str, object]:
    """Materialise a page into ``where`` and return what the runner does for it: its untitled Python blocks and
    its CLI and script commands in their safe forms. Commands with a cheaper check (``make -n``, ``bash -n``,
    extras, YAML syntax) are checked here, directly."""
    blocks = code_blocks(page)
    materialise(blocks, where)
    cli = []
    for block in blocks:
        if block.lang == "yaml":
            yaml.safe_load(block.body)
        if block.lang not in ("bash", "sh", "shell"):
            continue
        for command in shell_commands(block.body):
            check_paths(command, where)
            runner, argv = safe_form(command)
            if runner in ("dynprune", "script"):
                cli.append((command, runner, argv))
            elif runner in ("make", "bash"):
                dry = ["make", "-n", "-C", str(ROOT), *argv] if runner == "make" else ["bash", "-n", *argv]
                result = subprocess.run(dry, cwd=where, capture_output=True, text=True)
                assert result.returncode == 0, f"`{command}` ({block.where}) fails as a dry run:\n{result.stderr}"
            else:
                extras = configparser.ConfigParser()
                extras.read(ROOT / "setup.cfg")
                missing = set(argv) - set(extras["options.extras_require"])
                assert not missing, f"`{command}` ({block.where}) names extras setup.cfg lacks: {missing}"
    python = [(b.where, b.body) for b in blocks if b.lang == "python" and not b.title]
    return {"dir": str(where), "python": python, "cli": cli}


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, object], dict[str, object]]]:
    """Run every page's blocks in one fresh interpreter (one import of torch and Lightning for all pages):
    {page: (its job, its results)}; a page whose job cannot be built maps to the exception."""
    jobs, errors = {}, {}
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        try:
            jobs[name] = page_job(page, tmp_path_factory.mktemp(re.sub(r"\W", "_", name)))
        except (AssertionError, ValueError, yaml.YAMLError) as err:
            errors[name] = err
    work = tmp_path_factory.mktemp("runner")
    runner_jobs = {name: {"dir": job["dir"], "python": job["python"],
                          "cli": [(runner, argv) for _, runner, argv in job["cli"]]} for name, job in jobs.items()}
    (work / "jobs.json").write_text(json.dumps(runner_jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(work / "jobs.json"), str(work / "results.json")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the docs runner crashed:\n{result.stderr[-4000:]}"
    results = json.loads((work / "results.json").read_text())
    return {**{name: (job, results[name]) for name, job in jobs.items()}, **errors}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page: Path, docs_run: dict[str, object]) -> None:
    """Every Python, shell and YAML block of the page runs (shell commands in their safe form)."""
    outcome = docs_run[str(page.relative_to(ROOT))]
    if isinstance(outcome, Exception):
        raise outcome
    job, result = outcome
    assert result["python"] is None, f"a Python block failed:\n{result['python'][-4000:]}"
    for (command, _, argv), (code, output) in zip(job["cli"], result["cli"], strict=True):
        assert code == 0, f"`{command}` fails when run as {argv}:\n{code if isinstance(code, str) else output}"


def test_safe_forms() -> None:
    """Shell commands map to checks without side effects; a command with no rule is refused."""
    assert safe_form("WANDB_MODE=offline .venv/bin/dynprune fit --config c.yaml") == (
        "dynprune", ["fit", "--config", "c.yaml", "--print_config"])
    assert safe_form("python -m dynprune sweep s.yaml --count 2") == ("dynprune", ["sweep", "s.yaml", "--count", "2",
                                                                                    "--help"])
    assert safe_form("dynprune bench b.yaml --jobs 2") == ("dynprune", ["bench", "b.yaml", "--dry-run", "--root",
                                                                        "bench_dry_run"])
    assert safe_form("python my_cli.py fit --config c.yaml") == ("script", ["my_cli.py", "fit", "--config", "c.yaml",
                                                                        "--print_config"])
    assert safe_form("python experiments/pareto.py a.csv") == ("script", ["experiments/pareto.py", "a.csv", "--help"])
    assert safe_form("pip install -e '.[dev,docs]'") == ("extras", ["dev", "docs"])
    with pytest.raises(ValueError, match="no safe form"):
        safe_form("rm -rf runs")
    assert shell_commands("a \\\n  b  # note\n# only a comment\n\nc") == ["a b", "c"]


def test_block_collector_finds_indented_and_titled_blocks(tmp_path: Path) -> None:
    """Blocks inside admonitions are found, dedented, with their titles and line numbers."""
    page = tmp_path / "page.md"
    page.write_text('text\n\n```python title="m.py"\nx = 1\n```\n\n!!! note\n    ```bash\n    make test\n    ```\n')
    page_blocks = [(b.line, b.lang, b.title, b.body) for b in code_blocks(page)]
    assert page_blocks == [(4, "python", "m.py", "x = 1\n"), (9, "bash", None, "make test\n")]


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes: no broken link, missing page or unresolved API reference."""
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_readme_stays_a_two_minute_read() -> None:
    """The README stays short (details belong in docs/: 165 lines hold the issues' results tables, ResNet at two
    budgets, ViT, GPT and latency cost, and little prose) and keeps the results marker the benchmark fills in."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 165, f"README.md has {len(lines)} lines; move detail to docs/"
    assert any(line.startswith("## Results") for line in lines)


def test_commands_must_name_files_that_exist(tmp_path: Path) -> None:
    """A config or script a command reads must exist; an output path need not."""
    (tmp_path / "c.yaml").write_text("{}")
    check_paths("dynprune fit --config c.yaml --out new.yaml", tmp_path)
    with pytest.raises(AssertionError, match="missing.yaml"):
        check_paths("dynprune fit --config missing.yaml", tmp_path)
    with pytest.raises(AssertionError, match="gone.py"):
        check_paths("python gone.py --help", tmp_path)


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the repository (anchors aside), or a results file that
    mkdocs.yml declares as expected before the benchmark has written it."""
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pending = {f"experiments/results/{name}" for name in site["extra"]["results"]["expected"]}
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists() and link not in pending]
    assert links and not broken, f"README links to missing files: {broken}"
