"""The manual's Python API example (docs/python-api.md), run as written on a store and run of the test's own."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from harvest.run import harvest
from tests.conftest import compose, harvest_overrides
from tests.train.test_loop import make_cfg
from train.loop import train

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
DEMO_STORE = "data/activations/smollm2-135m_resid_post20"
DEMO_SAE = "results/demo/runs/switch8_2048/sae"


def manual_example() -> str:
    """The python block right after the `python-api-example` marker."""
    text = PAGE.read_text()
    found = re.search(r"<!-- python-api-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/python-api.md lost its Python API example"
    return found.group(1)


@pytest.fixture(scope="module")
def store_and_sae(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, root / "store", tokens=600)))
    train(make_cfg(root / "store", "model=switch", "model.n_experts=2", "model.width=64", "model.k=4",
                   "budget=steps:20", "batch_size=32"), root / "run")
    return root / "store", root / "run" / "sae"


def test_the_manuals_python_example_runs_as_written(store_and_sae):
    code = manual_example()
    assert DEMO_STORE in code and DEMO_SAE in code  # the paths the test swaps for its own
    store, sae = store_and_sae
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(code.replace(DEMO_STORE, str(store)).replace(DEMO_SAE, str(sae)), scope)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 4, lines
    values = [float(line.split()[0]) for line in lines[:3]]
    assert values == sorted(values, reverse=True) and values[0] > 0  # top contexts, strongest first
    assert all("<<" in line and ">>" in line for line in lines[:3])
    ce = scope["ce_metrics"](scope["lm"], scope["store"].layer, scope["store"].site, {"sae": scope["sae"]},
                             scope["seqs"], scope["store"].first_pos)["sae"]
    assert lines[3] == str(ce)  # the printed CE metrics are the real ones, reproducible
    assert ce["ce_clean"] <= ce["ce_sae"] or ce["kl"] >= 0
    assert scope["codes"].expert is not None and scope["act"].shape == (scope["acts"].shape[0],)
