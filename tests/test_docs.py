"""The manual (docs/, mkdocs.yml): it builds with no warning, every architecture has its page, the
generated pages say what the code says, and the strict build does catch what it claims to catch."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.saes import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    out = build(ROOT / "mkdocs.yml", site)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr
    return site


def nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_manual_builds_strict_and_holds_every_page(site):
    assert (site / "index.html").is_file() and (site / "architectures" / "switch" / "index.html").is_file()


def test_every_architecture_has_a_page_filled_from_its_code(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", ""))
    pages = nav_pages(config["nav"])
    for arch in REGISTRY:
        page = f"architectures/{arch}.md"
        assert page in pages, f"{page} is not in mkdocs.yml's nav"
        assert f"<!-- architecture: {arch} -->" in (ROOT / "docs" / page).read_text(), page
        html = (site / "architectures" / arch / "index.html").read_text()
        options = (ROOT / "conf" / "train" / "model" / f"{arch}.yaml").read_text().splitlines()
        assert f"arch: {arch}" in options and "Definition" in html and "Options" in html
        first = ast.get_docstring(ast.parse((ROOT / "train" / "saes" / f"{arch}.py").read_text())).split()[0]
        assert first in html, arch


def test_the_layout_page_lists_every_module_with_its_docstring(site):
    html = (site / "layout" / "index.html").read_text()
    modules = [p for package in ("runtime", "harvest", "train", "train/saes", "eval", "interop", "pipeline", "bench")
               for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 50
    for module in modules:
        assert f"<code>{module.name}</code>" in html, module
    assert "The held-out view of a store" in html  # harvest/held_out.py's own first words


def test_the_readme_is_short_and_points_to_the_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make setup && make test" in readme and "make demo" in readme and "make docs" in readme
    for link in ("docs/getting-started.md", "docs/harvest.md", "docs/train.md", "docs/evaluate.md"):
        assert f"]({link})" in readme and (ROOT / link).is_file(), link


@pytest.mark.parametrize("fault", ["a page left out of the nav", "a link to a missing anchor"])
def test_the_strict_build_fails_on_what_it_guards(fault, tmp_path):
    """The same manual with one fault planted (a copy; the hooks still read the real code) fails to build."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("hooks.py", "__pycache__"))
    if fault == "a page left out of the nav":
        (docs / "orphan.md").write_text("# Orphan\n")
    else:
        with (docs / "design.md").open("a") as f:
            f.write("\nSee [the harvest's codecs](harvest.md#no-such-section).\n")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}").replace("  - docs/hooks.py",
                                                                              f"  - {ROOT / 'docs' / 'hooks.py'}")
    (tmp_path / "mkdocs.yml").write_text(config)
    out = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert out.returncode != 0, out.stderr
    assert ("orphan.md" if "nav" in fault else "no-such-section") in out.stderr, out.stderr
