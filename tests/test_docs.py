"""The documentation: the site builds with `mkdocs build --strict` (a broken link or anchor, a page
missing from the navigation or the navigation naming a missing page, a docstring mkdocstrings cannot
render: each is a warning, and --strict fails on it), every module of the API reference is rendered,
and the README stays one page that holds the two quick-start commands unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
DEMO = "python3 -m venv .venv && .venv/bin/pip install -c .ci/constraints.txt -e . && .venv/bin/fer-dist demo"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0, not a warning of ours
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    problems = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or log.splitlines()[-30:])
    return out


def nav_pages(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def built(site: Path, page: str) -> Path:
    """The HTML file mkdocs makes of a page (use_directory_urls: `a/b.md` -> `a/b/index.html`)."""
    stem = page.removesuffix(".md")
    return site / (stem.removesuffix("index") if stem.endswith("index") else stem + "/") / "index.html"


def test_every_page_is_built_and_every_api_module_rendered(site: Path) -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk
    for page in pages:
        assert built(site, page).is_file(), page
    api = [page for page in pages if page.startswith("api/")]
    assert {"api/data.md", "api/models.md", "api/engine.md", "api/results.md", "api/jobs.md"} <= set(api)
    for page in api:
        modules = re.findall(r"^::: ([\w.]+)$", (ROOT / "docs" / page).read_text(), re.M)
        assert modules, page
        html = built(site, page).read_text()
        for module in modules:
            # mkdocstrings gives each rendered object a heading with its path as id
            assert f'id="{module}"' in html, f"{module} not rendered on {page}"


def test_every_module_is_in_the_api_reference_and_the_architecture_page() -> None:
    """The API reference renders every module (but a sub-package's bare `__init__`), and the layout
    table of docs/architecture.md names every module file, benchmarks included."""
    rendered = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        rendered |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M))
    package = ROOT / "fer_dist"
    files = [p for p in package.rglob("*.py") if p.name != "__init__.py" or p.parent == package / "models"]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in files}
    missing = sorted(n for n in names if not n.startswith("fer_dist.bench") and n not in rendered)
    assert not missing, f"not in docs/api: {missing}"
    table = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = []
    for p in files:
        relative = p.relative_to(package)
        shown = f"fer_dist/{relative}" if len(relative.parts) == 1 else str(relative)
        if f"`{shown}`" not in table:
            unnamed.append(shown)
    assert not unnamed, f"not in docs/architecture.md's layout table: {unnamed}"


def test_readme_links_reach_built_pages(site: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README links to {path}, which does not exist"
        if path.startswith("docs/") and path.endswith(".md"):
            html = built(site, path.removeprefix("docs/")).read_text()
            assert not anchor or f'id="{anchor}"' in html, f"README links to {link}: no such heading"


def quick_start(readme: str) -> tuple[str, list[str]]:
    """The quick-start section's heading and the commands of its code blocks."""
    sections = re.split(r"^## ", readme, flags=re.M)
    [section] = [s for s in sections if "quick start" in s.split("\n", 1)[0].lower()]
    heading, body = section.split("\n", 1)
    return heading, [block.strip() for block in re.findall(r"^```[^\n]*\n(.*?)^```", body, re.M | re.S)]


def test_readme_is_one_page_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    heading, commands = quick_start(readme)
    assert heading == "Two-command quick start"
    assert len(commands) == 2, commands
    assert commands[0] == DEMO
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the README's second quick-start command is not what .ci/run runs"
    assert "pytest" in commands[1] and "'.[dev]'" in commands[1]
