"""The documentation: its code runs, the site builds strictly, and the API reference is complete.

How page code is run: every fenced block that opens with exactly ```` ```python ```` (at the
start of a line) in a page of `EXECUTED_PAGES` is executed, in order, in one namespace per page,
so a later block sees an earlier block's names, like cells of a notebook. Blocks fenced
```` ```py ```` (or any other language) are shown in the docs but not run; use them for code that
cannot run here (a `@hydra.main` script, a SLURM launch). Each block is compiled with the page's
path and its real line numbers, so a failure's traceback points into the Markdown file. The
blocks run in a temporary working directory (and `tempfile` writes there), so pages may write
files freely.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))

EXECUTED_PAGES = [
    "getting-started.md",
    "tutorials/library-compatibility.md",
    "tutorials/configuration.md",
    "tutorials/design-decisions.md",
    "storage.md",
    "training-controls/lr-find.md",
    "training-controls/on-exception.md",
    "training-controls/weight-averaging.md",
    "observing.md",
    "training-controls/accumulate.md",
    "training-controls/loop.md",
    "data/grain.md",
    "training-controls/precision.md",
    "observing/media.md",
    "observing/mlflow.md",
    "population.md",
]

# Subpackages whose public names must all appear in the API reference.
PUBLIC_MODULES = [
    "solstice",
    "solstice.callbacks",
    "solstice.datamodules",
    "solstice.loggers",
    "solstice.trainer",
    "solstice.checkpointing",
    "solstice.storage",
    "solstice.tuner",
]

# Pages in the nav that other work items write. Until they exist, the strict build test puts a
# placeholder in its copy of the docs (never in the repository). Remove an entry once its page
# has landed, so that the build test guards it too.

# What the site is built from: mkdocs.yml, the docs, and the files pages include as snippets.
SITE_SOURCES = ["mkdocs.yml", "README.md", "docs", "examples", "benchmarks"]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """`(line index of the first code line, code)` for every ```` ```python ```` block."""
    blocks, current, start = [], None, 0
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if current is None:
            if line.rstrip() == "```python":
                current, start = [], i + 1
        elif line.rstrip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    if current is not None:
        raise ValueError(f"{path}: the ```python block opened on line {start} is never closed.")
    return blocks


def test_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\na = 1\n```\n```py\nnot run\n```\n  ```python\nindented\n  ```\n"
        "```python\nb = a + 1\n\n```\n"
    )
    assert python_blocks(page) == [(2, "a = 1\n"), (11, "b = a + 1\n\n")]


# Pages about an optional backend run where it is installed (it is in the `dev` extra).
PAGE_REQUIRES = {"observing/mlflow.md": "mlflow"}


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch):
    if page in PAGE_REQUIRES:
        pytest.importorskip(PAGE_REQUIRES[page])
    path = DOCS / page
    blocks = python_blocks(path)
    assert blocks, f"{page} has no ```python blocks to run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": "docs_" + re.sub(r"\W", "_", page.removesuffix(".md"))}
    environ = dict(os.environ)  # a page may point the process somewhere (AWS_ENDPOINT_URL)
    try:
        for start, code in blocks:
            # Blank lines first, so the compiled block's line numbers are the page's own.
            exec(compile("\n" * start + code, str(path), "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(environ)


# ---------------------------------------------------------------------------------------------
# API reference


def public_names(module: types.ModuleType) -> list[str]:
    """The module's `__all__`, or else its non-underscore, non-module attributes."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in dir(module) if not name.startswith("_")]
    return sorted(n for n in names if not isinstance(getattr(module, n), types.ModuleType))


def resolve(dotted: str) -> object:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return importlib.import_module(dotted)


def api_reference() -> tuple[str, list[str]]:
    text = "\n".join(page.read_text(encoding="utf-8") for page in API_PAGES)
    return text, re.findall(r"^:::\s+([\w.]+)", text, flags=re.MULTILINE)


def test_every_public_name_is_in_the_api_reference():
    """Each public name is rendered (`::: module.name`) or, if it is a re-export of a rendered
    object, named in the reference text as `module.name` (e.g. `solstice.CSVLogger`)."""
    text, directives = api_reference()
    rendered = {id(resolve(d)) for d in directives}
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            full = f"{module_name}.{name}"
            if full in directives:
                continue
            if id(getattr(module, name)) in rendered and f"`{full}`" in text:
                continue
            missing.append(full)
    assert not missing, (
        f"Public names missing from the API reference (docs/api/*.md): {missing}. Add a "
        "`::: <name>` line to the page of its subpackage, or, for a re-export of an object "
        "documented elsewhere in docs/api, mention it as `<name>` in backticks."
    )


def test_api_reference_names_only_real_objects():
    _, directives = api_reference()
    assert directives
    for dotted in directives:
        resolve(dotted)  # raises if a page documents something that does not exist


# ---------------------------------------------------------------------------------------------
# the site


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install the docs tools)")
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    pytest.importorskip(
        "mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed"
    )

    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "runs", "data")
    for name in SITE_SOURCES:
        path = ROOT / name
        if path.is_dir():  # (docs/data/ holds pages, not downloaded data)
            pages = shutil.ignore_patterns("__pycache__", "*.pyc") if name == "docs" else None
            shutil.copytree(path, source / name, ignore=pages or ignore)
        elif path.exists():
            shutil.copy2(path, source / name)
    (source / "solstice").symlink_to(ROOT / "solstice", target_is_directory=True)
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # no advertisement in the output
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"`mkdocs build --strict` failed:\n{result.stderr[-6000:]}"

    callbacks = (site / "api" / "callbacks" / "index.html").read_text(encoding="utf-8")
    assert 'id="solstice.callbacks.ModelCheckpoint"' in callbacks
    assert "<strong>Arguments:</strong>" in callbacks  # Equinox-style docstrings rendered
    assert "<li><code>monitor</code>" in callbacks  # ... with their argument lists
    home = (site / "index.html").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    title = next(line[2:].strip() for line in readme if line.startswith("# "))
    assert f">{title}<" in home and "In this documentation" in home  # the README, included
    example = (site / "examples" / "cifar_convnext" / "index.html").read_text(encoding="utf-8")
    assert "ConvNeXtBlock" in example  # the example's source, included
