"""The documentation site: it builds with warnings as errors, documents every public name,
every exception with guidance, and every command-line verb.

The site is built once (``mkdocs build --strict`` into a temporary folder); the
checks read the built HTML, so they see what a reader sees.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import aiovirtstream

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = (
    "aiovirtstream",
    "aiovirtstream.testing",
    "aiovirtstream.libvirtaio",
    "aiovirtstream.pytest_plugin",
)
# The guidance written by hand under each exception of docs/errors.md.
GUIDANCE = "**What to do:**"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _require_docs_tools() -> None:
    """Skip (fail in CI) when the ``docs`` extra is not installed."""
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe")
        if importlib.util.find_spec(name.split(".")[0]) is None
    ]
    if not missing:
        return
    message = f"the docs extra is missing ({', '.join(missing)}): pip install -e '.[docs]'"
    if _in_ci():
        pytest.fail(f"{message}, and CI=true: the docs must build there", pytrace=False)
    pytest.skip(f"{message}; the docs are built in CI")


@dataclass(frozen=True)
class Site:
    returncode: int
    output: str
    folder: Path

    def anchors(self, page: str | None = None) -> set[str]:
        """The ``id`` attributes of every built page (or of one page, e.g. ``errors.html``)."""
        pages = [self.folder / page] if page else self.folder.rglob("*.html")
        ids: set[str] = set()
        for path in pages:
            ids.update(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))
        return ids


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    _require_docs_tools()
    folder = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return Site(done.returncode, done.stdout + done.stderr, folder)


@pytest.fixture(scope="module")
def built(site: Site) -> Site:
    if site.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{site.output}", pytrace=False)
    return site


def _public_names() -> list[tuple[str, str, object]]:
    """(module, name, object) for every name of every public module's ``__all__``."""
    found = []
    for module_name in PUBLIC_MODULES:
        module: ModuleType = importlib.import_module(module_name)
        for name in module.__all__:
            found.append((module_name, name, getattr(module, name)))
    return found


def _documented_as(module_name: str, name: str, obj: object) -> list[str]:
    """The anchors under which the object may be documented: its own path, or the
    package's name for the same object (``aiovirtstream.testing.SandboxError`` is
    ``aiovirtstream.SandboxError``)."""
    paths = [f"{module_name}.{name}"]
    paths += [
        f"aiovirtstream.{top}"
        for top in aiovirtstream.__all__
        if getattr(aiovirtstream, top) is obj and not isinstance(obj, (int, str))
    ]
    return paths


def test_site_builds_strict(site: Site) -> None:
    """No warning: every link between pages and anchors resolves, every ``:::`` object exists."""
    assert site.returncode == 0, f"mkdocs build --strict failed:\n{site.output}"
    for page in ("index.html", "getting-started.html", "errors.html", "cli.html", "changelog.html"):
        assert (site.folder / page).is_file(), page


def test_every_public_name_is_in_the_reference(built: Site) -> None:
    anchors = built.anchors()
    missing = [
        f"{module_name}.{name}"
        for module_name, name, obj in _public_names()
        if not any(path in anchors for path in _documented_as(module_name, name, obj))
    ]
    assert not missing, f"public names without an entry in the API reference: {missing}"


def test_every_exception_is_on_the_errors_page_with_guidance(built: Site) -> None:
    anchors = built.anchors("errors.html")
    exceptions = {
        (module_name, name, obj)
        for module_name, name, obj in _public_names()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert len(exceptions) >= 20
    missing = [
        f"{module_name}.{name}"
        for module_name, name, obj in exceptions
        if not any(path in anchors for path in _documented_as(module_name, name, obj))
    ]
    assert not missing, f"exceptions missing from docs/errors.md: {missing}"

    # Each ``::: object`` of errors.md is followed by the hand-written guidance.
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    blocks = re.split(r"^::: ", text, flags=re.MULTILINE)[1:]
    without = [
        block.split()[0]
        for block in blocks
        if GUIDANCE not in block and not block.split()[0].endswith(("_errors", "_to_exception"))
    ]
    assert not without, f"exceptions in docs/errors.md without '{GUIDANCE}': {without}"


def test_every_public_name_has_a_docstring() -> None:
    _require_docs_tools()
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    package = loader.load("aiovirtstream")
    loader.resolve_aliases(implicit=False, external=False)
    undocumented = []
    for module_name, name, _obj in _public_names():
        module = package if module_name == "aiovirtstream" else package[module_name[14:]]
        docstring = module[name].docstring
        if docstring is None or not docstring.value.strip():
            undocumented.append(f"{module_name}.{name}")
    assert not undocumented, f"public names without a docstring: {undocumented}"


def _cli_help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "aiovirtstream", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli_verbs() -> list[str]:
    """The verbs ``python -m aiovirtstream --help`` lists: argparse's sub-commands (a
    ``{a,b}`` choice, or entries indented below the ``VERB`` metavar), or a click-style
    ``Commands:`` section."""
    text = _cli_help()
    choices = re.search(r"\{([\w,-]+)\}", text)
    if choices:
        return choices.group(1).split(",")
    section = re.search(r"^Commands:?\n(.*?)(?:\n\s*\n|\Z)", text, re.S | re.M | re.I)
    if section:
        return re.findall(r"^ {2}([a-z][\w-]*)(?: {2,}|$)", section.group(1), re.M)
    verbs = re.findall(r"^ {4}([a-z][\w-]*)(?: {2,}|$)", text, re.M)
    assert verbs, f"no verbs found in the --help output:\n{text}"
    return verbs


def test_cli_page_has_every_verb() -> None:
    verbs = _cli_verbs()
    assert {"upload", "download"} <= set(verbs), verbs
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = [verb for verb in verbs if f"aiovirtstream {verb}" not in page]
    assert not missing, f"verbs of 'aiovirtstream --help' not in docs/cli.md: {missing}"


def test_cli_page_has_every_option() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []
    for verb in _cli_verbs():
        options = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _cli_help(verb))) - {"--help"}
        missing += [f"{verb} {option}" for option in sorted(options) if option not in page]
    assert not missing, f"options of 'aiovirtstream VERB --help' not in docs/cli.md: {missing}"
