"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated from the code at build time, so
that they cannot go stale.

- `layout.md`: every package and module of the toolkit with the first paragraph of its docstring
  (read with `ast`; nothing is imported).
- `<!-- architecture: <arch> -->` in a page: replaced by that architecture's definition (the
  docstring of train/saes/<arch>.py), its options (conf/train/model/<arch>.yaml) and its cost formula
  (the docstring of its `cost_formula`). An unknown architecture fails the build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
# in import order: a package imports only packages above it (tests/test_layers.py)
PACKAGES = ("runtime", "harvest", "train", "train/saes", "eval", "interop", "pipeline", "bench")
MARKER = re.compile(r"<!-- architecture: (\w+) -->")


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph as one line, `|` escaped for a Markdown table."""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(paragraph.split()).replace("|", "\\|") or "(no docstring)"


def layout_page() -> str:
    lines = ["# Layout", "",
             "Every package and module of the toolkit, with the first paragraph of its own docstring. This page "
             "is generated when the site is built (`docs/hooks.py`), so it says what the code says. The "
             "packages are listed in import order: each imports only those above it.", ""]
    for package in PACKAGES:
        folder = ROOT / package
        lines += [f"## `{package}/`", "", first_paragraph(docstring(folder / "__init__.py")), "",
                  "| module | what it is |", "|---|---|"]
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py":
                lines.append(f"| `{module.name}` | {first_paragraph(docstring(module))} |")
        lines.append("")
    return "\n".join(lines)


def cost_docstring(tree: ast.Module) -> str:
    """The docstring of the `cost_formula` its SAE class defines ("" if it has none)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "cost_formula":
            return ast.get_docstring(node) or ""
    return ""


def architecture_section(arch: str) -> str:
    module, yaml = ROOT / "train" / "saes" / f"{arch}.py", ROOT / "conf" / "train" / "model" / f"{arch}.yaml"
    if not module.exists() or not yaml.exists():
        raise ValueError(f"<!-- architecture: {arch} -->: no train/saes/{arch}.py or conf/train/model/{arch}.yaml")
    tree = ast.parse(module.read_text())
    parts = ["## Definition", "", f"From the docstring of `train/saes/{arch}.py`:", "", "```text",
             ast.get_docstring(tree) or "", "```", "", "## Options", "",
             f"`model={arch}` reads `conf/train/model/{arch}.yaml`; every key can be set on the command line as "
             f"`model.<key>=<value>`, and a constructor argument left out in Python takes the same default:", "",
             "```yaml", yaml.read_text().rstrip(), "```", ""]
    cost = cost_docstring(tree)
    if cost:
        parts += ["## Cost", "", "Parameters and FLOPs per token (`train/saes/flops.py` has the conventions):", "",
                  "```text", cost, "```", ""]
    return "\n".join(parts)


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "layout.md", content=layout_page()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return MARKER.sub(lambda m: architecture_section(m.group(1)), markdown)
