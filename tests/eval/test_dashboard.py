"""`python -m eval.dashboard`: a tiny harvested store -> topk and switch runs -> static HTML pages,
checked for well-formed HTML, working links, the right contexts (recomputed here), escaping, bad input."""

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as compose_cfg, initialize_config_dir
from transformers import AutoTokenizer

from eval.dashboard import Contexts, DashboardConfig, DashboardError, build_dashboard
from eval.dashboard_html import Context, FeaturePage, feature_page, index_page, token_html
from harvest.run import harvest
from harvest.store import ActivationStore
from tests.conftest import CONF, ROOT, compose, harvest_overrides
from tests.train.test_loop import make_cfg
from harvest.held_out import split_chunks
from train.loop import train
from train.saes import load

RUNS = {"topk": ["model=topk", "model.width=64", "model.k=4"],
        "switch": ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"],
        "relu": ["model=relu", "model.width=64", "model.l1_coeff=0.01"]}
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


@pytest.fixture(scope="module")
def runs(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """A 20-chunk store of the tiny GPT-2 (d=32; held-out chunks 9 and 19: 60 rows; every sequence starts
    with the separator <|endoftext|>) and a topk, a switch and a relu run trained on it."""
    root = tmp_path_factory.mktemp("dash")
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, root / "store", tokens=600,
                                      **{"dataset.packing": "document"})))
    for name, model in RUNS.items():
        train(make_cfg(root / "store", *model, "budget=steps:40", "batch_size=32"), root / name)
    return root


def config(run, *overrides) -> DashboardConfig:
    """The dashboard config exactly as `python -m eval.dashboard run=<run> <overrides>` sees it."""
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        return DashboardConfig.from_omegaconf(
            compose_cfg("dashboard", overrides=[f"run={run}", "progress=false", "device=cpu", *overrides]))


class Checker(HTMLParser):
    """Tags must nest and close; text outside script/style must hold no raw <, > or &."""

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if not (self.stack and self.stack[-1] in ("script", "style")) and any(c in data for c in "<>&"):
            self.errors.append(f"unescaped text {data!r}")


def check(text: str) -> Checker:
    c = Checker()
    c.feed(text)
    c.close()
    assert c.errors == [] and c.stack == [], (c.errors, c.stack)
    assert text.startswith("<!DOCTYPE html>")
    return c


class Tables(HTMLParser):
    """Rows of every table with an id: {"row": data-row, "cells": [text], "spans": [(text, attrs)]}."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict]] = {}
        self.table = self.cell = self.span = None
        self.h1 = ""
        self.in_h1 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(a.get("id", "?"), [])
        elif tag == "tr" and self.table is not None:
            self.table.append({"row": int(a.get("data-row", -1)), "cells": [], "spans": [], "v": []})
        elif tag in ("td", "th") and self.table is not None:
            self.table[-1]["cells"].append("")
            self.table[-1]["v"].append(a.get("data-v"))
            self.cell = True
        elif tag == "span" and self.cell:
            self.table[-1]["spans"].append(["", a])
            self.span = True
        self.in_h1 = self.in_h1 or tag == "h1"

    def handle_endtag(self, tag):
        self.table = None if tag == "table" else self.table
        self.cell = None if tag in ("td", "th") else self.cell
        self.span = None if tag == "span" else self.span
        self.in_h1 = self.in_h1 and tag != "h1"

    def handle_data(self, data):
        if self.cell:
            self.table[-1]["cells"][-1] += data
        if self.span:
            self.table[-1]["spans"][-1][0] += data
        if self.in_h1:
            self.h1 += data


def tables(path: Path) -> Tables:
    t = Tables()
    t.feed(path.read_text(encoding="utf-8"))
    return t


def acts_of(run: Path):
    """Independent: every held-out row of the store encoded at once -> (global row ids [n], acts [n, M])."""
    store, sae = ActivationStore(run.parent / "store"), load(run / "sae")
    held = split_chunks(store.n_chunks, 0.1)[1]
    ids = np.concatenate([i * store.chunk_rows + np.arange(store.chunk_rows) for i in held])
    x = torch.from_numpy(np.concatenate([store.read_chunk(i) for i in held]))
    with torch.no_grad():
        codes = sae.encode(x)
    if codes.dense is None:
        return store, sae, ids, torch.zeros(len(x), sae.n_latents).scatter_(1, codes.idx, codes.vals).numpy()
    return store, sae, ids, codes.dense.numpy()


def test_top_contexts_are_the_ones_recomputed_here(runs, tiny_gpt2):
    store, sae, ids, A = acts_of(runs / "topk")
    f = int(A.max(0).argmax())  # the feature with the largest activation anywhere
    g = int((A > 0).sum(0).argmax())  # the densest
    out = runs / "pages_topk"
    build_dashboard(config(runs / "topk", f"features=[{f},{g}]", f"out={out}", "outlier_factor=null",
                           "left=4", "right=3", "n_top=5"))
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    local = {int(r): i for i, r in enumerate(ids)}
    rps, first = store.rows_per_seq, store.first_pos
    for feat in (f, g):
        page = tables(out / f"feature_{feat}.html")
        top = page.tables["top"][1:]  # after the header row
        assert len(top) == min(5, int((A[:, feat] > 0).sum()))
        r = int(A[:, feat].argmax())
        row = int(ids[r])
        seq, pos = row // rps, first + row % rps
        lo = max(0, pos - 4)
        window = store.contexts[seq][lo : pos + 4].tolist()
        text = "".join(tok.decode([t], clean_up_tokenization_spaces=False) for t in window).replace("\n", "↵")
        first_row = top[0]
        assert first_row["row"] == row and first_row["cells"][1] == text
        assert float(first_row["cells"][0]) == pytest.approx(A[r, feat], rel=1e-3)
        # the shaded tokens are exactly those where the feature fires (computed here), the hit is the row's
        fires = [p >= first and A[local[seq * rps + p - first], feat] > 0 for p in range(lo, lo + len(window))]
        assert ["title" in a for _, a in first_row["spans"]] == fires
        hit = [i for i, (_, a) in enumerate(first_row["spans"]) if "hit" in a["class"]]
        center = tok.decode([window[pos - lo]], clean_up_tokenization_spaces=False).replace("\n", "↵")
        assert hit == [pos - lo] and first_row["spans"][pos - lo][0] == center
        assert "rgba(255, 110, 0, 1.000)" in first_row["spans"][pos - lo][1]["style"]
        values = [float(t["cells"][0]) for t in top]
        assert values == sorted(values, reverse=True)
        # non-firing samples really do not fire; decile samples do
        zero = page.tables["zero"][1:]
        assert zero and all(A[local[z["row"]], feat] == 0 for z in zero)
        deciles = [t for k, v in page.tables.items() if k.startswith("decile") for t in v[1:]]
        assert deciles and all(A[local[d["row"]], feat] > 0 for d in deciles)
    index = tables(out / "index.html").tables["features"][1:]
    assert {int(r["cells"][0]) for r in index} == {f, g}
    densities = {int(r["cells"][0]): float(r["v"][1]) for r in index}
    assert densities[g] == pytest.approx((A[:, g] > 0).mean())


def test_every_page_is_valid_html_linked_and_sorted_by_density(runs):
    out = runs / "pages_switch"
    index = build_dashboard(config(runs / "switch", "n_features=6", f"out={out}", "outlier_factor=null"))
    assert index == out / "index.html"
    pages = sorted(out.glob("feature_*.html"))
    links = check(index.read_text(encoding="utf-8")).links
    assert len(links) == 6 and sorted(out / link for link in links) == pages
    for page in pages:
        assert check(page.read_text(encoding="utf-8")).links == ["index.html"]
    rows = tables(index).tables["features"][1:]
    dens = [float(r["v"][2]) for r in rows]  # columns: feature, expert, density, ...
    assert dens == sorted(dens, reverse=True) and len(set(dens)) > 1
    _, sae, _, A = acts_of(runs / "switch")
    for r in rows:  # each feature's expert and density, recomputed here
        f = int(r["cells"][0])
        assert int(r["cells"][1]) == f // sae.expert_width
        assert float(r["v"][2]) == pytest.approx((A[:, f] > 0).mean())
        assert tables(out / f"feature_{f}.html").h1 == f"Feature {f}, expert {f // sae.expert_width}"
    # the separator token appears in contexts, always escaped
    html = "".join(p.read_text(encoding="utf-8") for p in pages)
    assert "&lt;|endoftext|&gt;" in html and "<|endoftext|>" not in html


def test_top_density_picks_the_densest(runs):
    out = runs / "pages_dense"
    build_dashboard(config(runs / "topk", "features=top_density", "n_features=4", f"out={out}",
                           "outlier_factor=null"))
    _, _, _, A = acts_of(runs / "topk")
    counts = (A > 0).sum(0)
    shown = {int(p.stem.split("_")[1]) for p in out.glob("feature_*.html")}
    assert len(shown) == 4 and min(counts[list(shown)]) >= max(np.delete(counts, list(shown)))


def test_dense_codes_relu(runs):
    _, _, ids, A = acts_of(runs / "relu")
    fires = (A > 0).sum(0)
    f = int(np.flatnonzero(fires)[0])
    out = runs / "pages_relu"
    build_dashboard(config(runs / "relu", f"features=[{f}]", f"out={out}", "outlier_factor=null"))
    (row,) = tables(out / "index.html").tables["features"][1:]
    assert row["cells"][0] == str(f) and row["v"][2] == str(fires[f])  # feature, density, fires
    top = tables(out / f"feature_{f}.html").tables["top"][1]
    assert top["row"] == ids[A[:, f].argmax()] and float(top["cells"][0]) == pytest.approx(A[:, f].max(), rel=1e-3)


def test_context_windows_stop_at_their_sequence():
    """Row r is position 1 + r % 3 of sequence r // 3; position 0 has no row, so the previous sequence's
    last row (which fires here) must not shade it."""

    class Store:  # the ActivationStore API over 4 sequences of 4 tokens, rows_per_seq 3
        first_pos = 1

        def locate(self, row):
            return row // 3, 1 + row % 3

        def row_at(self, seq, pos):
            return 3 * seq + pos - 1

        def sequence(self, seq):
            return np.arange(16).reshape(4, 4)[seq]

    class Tok:
        def decode(self, ids, clean_up_tokenization_spaces=False):
            return f"t{ids[0]}"

    ctx = Contexts(Store(), Tok(), left=5, right=1)
    c = ctx(4, np.array([2, 4, 5]), np.array([5.0, 3.0, 1.0], dtype=np.float32))  # sequence 1, position 2
    assert (c.tokens, c.acts, c.center, c.act, c.row) == (["t4", "t5", "t6", "t7"], [0.0, 0.0, 3.0, 1.0], 2, 3.0, 4)
    c = ctx(9, np.array([2, 4, 5]), np.array([5.0, 3.0, 1.0], dtype=np.float32))  # sequence 3, position 1
    assert (c.tokens, c.acts, c.center, c.act) == (["t12", "t13", "t14"], [0.0, 0.0, 0.0], 1, 0.0)


def test_tokens_are_escaped_in_text_and_tooltips():
    tokens = ["<script>", " a & b", '"q"', "'s", "\n"]
    ctx = Context(tokens, [0.0, 2.0, 0.0, 1.0, 0.0], center=1, act=2.0, row=7)
    html = "".join(token_html(t, a, 2.0, i == 1) for i, (t, a) in enumerate(zip(ctx.tokens, ctx.acts, strict=True)))
    assert "<script>" not in html and "&lt;script&gt;" in html and " a &amp; b" in html
    assert 'title="&#x27; a &amp; b&#x27;: 2"' in html and "&quot;q&quot;" in html
    page = FeaturePage(3, None, 0.5, 1, 2.0, [ctx], [("decile <10>", [ctx])], [ctx], [1, 0], [0.0, 1.0, 2.0])
    text = feature_page(page, "runs/<odd & name>", 2)
    check(text)
    t = Tables()
    t.feed(text)
    assert [s[0] for s in t.tables["top"][1]["spans"]] == ["<script>", " a & b", '"q"', "'s", "↵"]
    assert t.tables["top"][1]["spans"][1][1]["title"] == "' a & b': 2"
    check(index_page([page], "<title>", "a & b"))


def test_bad_input_is_one_line_before_any_work(runs, tmp_path):
    for args, line in [([f"run={tmp_path / 'nope'}"], f"run {tmp_path / 'nope'} does not exist"),
                       ([f"run={runs / 'topk'}", "n_features=0"], "n_features must be an integer >= 1, got 0")]:
        out = subprocess.run([sys.executable, "-m", "eval.dashboard", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2 and out.stderr == f"dashboard: error: {line}\n", out.stderr
    (tmp_path / "half").mkdir()
    cases = [((tmp_path / "half",), "has no trained SAE"),
             ((runs / "topk", "features=[3,64]"), r"^feature 64 out of range: the SAE has 64 latents \(0..63\)$"),
             ((runs / "topk", "features=[-1]"), r"features must be random, top_density or a non-empty list of feature "
                                                r"indices >= 0 like \[1,5,9\], got \[-1\]"),
             ((runs / "topk", "store=" + str(tmp_path)), "is not an activation store"),
             ((runs / "topk", "device=nonsense"), "device must be auto, cpu, cuda, cuda:N or mps, got 'nonsense'")]
    for (run, *over), message in cases:
        with pytest.raises(DashboardError, match=message):
            build_dashboard(config(run, f"out={tmp_path / 'o'}", *over))
    for bad, message in [("features=densest", "features must be"), ("features=[]", "features must be"),
                         ("bins=0", "bins"), ("outlier_factor=0.5", "outlier"), ("n_top=-1", "n_top")]:
        with pytest.raises(DashboardError, match=message):
            config(runs / "topk", bad)
    assert not (tmp_path / "o").exists()
