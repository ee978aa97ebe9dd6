"""SAELens interoperability, both ways, checked with SAELens itself.

Export: every architecture with a SAELens counterpart, with random weights (biases, thresholds, router),
written by `interop.export` and loaded by `sae_lens.SAE.load_from_disk`: SAELens's encode and decode
give our codes (scattered to [B, M]) and reconstructions. Switch through the plugin, plain and with
every variant at once. Import: SAELens SAEs built and saved by SAELens (`save_model`), imported onto a
store and evaluated by our eval: eval.json's numbers are those of SAELens's own forward pass on the same
held-out rows; geometry and dashboards take the imported run as it is. Round trip: export, import, the
same weights. Bad input: one line, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import SAE as LensSAE
from sae_lens.saes import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                           TopKSAE, TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata

import interop.saelens_switch  # noqa: F401  (registers "switch" with SAELens)
from eval.run import evaluate
from harvest.store import ActivationStore, Layout, StoreWriter
from interop.export import ExportConfig, export
from interop.import_saelens import ImportConfig, import_saelens
from tests.conftest import ROOT, eval_config
from tests.test_bad_input import files, run_in_process
from tests.train.test_loop import synthetic_store
from harvest.held_out import HeldOut
from train.run_dir import RunDir
from train.saes import Codes, build

D, LAYER, HOOK = 32, 2, "blocks.2.hook_resid_post"
EVAL_FRAC = 0.25  # held-out chunks 3 and 7 of 8
# (case id, our architecture, constructor arguments besides d)
OURS = [
    ("topk", "topk", dict(width=64, k=4)),
    ("relu", "relu", dict(width=64, l1_coeff=1.0, warmup_frac=0.0)),
    ("gated", "gated", dict(width=64, l1_coeff=1.0)),
    ("jumprelu", "jumprelu", dict(width=64, l0_coeff=0.001, warmup_frac=0.0, bandwidth=0.01, threshold_init=0.1)),
    ("batchtopk", "batchtopk", dict(width=64, k=4, theta_decay=0.99)),
    ("switch", "switch", dict(n_experts=4, expert_width=16, k=4, alpha=1.0)),
    ("switch-top2-shared-bias", "switch", dict(n_experts=4, expert_width=16, k=6, alpha=1.0, active_experts=2,
                                                shared_width=8, shared_k=2, balance="bias", bias_rate=0.01)),
    ("switch-global", "switch", dict(n_experts=4, expert_width=16, k=6, alpha=1.0, active_experts=2, routing="global")),
    ("matryoshka", "matryoshka", dict(width=64, k=4, theta_decay=0.99, prefixes=[0.125, 0.5])),
    ("matryoshka-switch", "matryoshka_switch", dict(n_experts=4, expert_width=16, k=4, alpha=1.0,
                                                    nesting="dictionary")),
]


# ------------------------------------------------------------------------------------------ fixtures

def make_store(path: Path, model: str, d: int = D, n_chunks: int = 8, seed: int = 0) -> Path:
    """A store of `model`'s block-2 resid_post: 8 chunks of 2 sequences x 8 rows, rows N(0.5, 1) in float16."""
    rng = np.random.default_rng(seed)
    layout = Layout(d_model=d, context_size=9, first_pos=1, chunk_seqs=2, n_chunks=n_chunks, acts_dtype="float16")
    writer = StoreWriter.create(path, layout, [], {"model": model, "layer": LAYER, "site": "resid_post", "config": {}})
    for i in range(n_chunks):
        rows = rng.normal(0.5, 1.0, (layout.chunk_rows, d)).astype(np.float16)
        writer.write_chunk(i, rows, rng.integers(0, 300, (2, 9)), {})
    return path


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory) -> Path:
    """The store; its model is the tiny GPT-2 folder, whose tokenizer the dashboard decodes with."""
    return make_store(tmp_path_factory.mktemp("interop") / "store", str(tiny_gpt2))


@pytest.fixture(scope="module")
def rows(store) -> torch.Tensor:
    """The store's held-out rows at EVAL_FRAC, float32 [32, d]: what eval reads of an imported run."""
    acts = ActivationStore(store)
    return torch.cat(list(HeldOut.of(acts, EVAL_FRAC, None).rows()))


@torch.no_grad()
def randomise(sae, seed: int):
    """Every weight random (encoder and decoder N(0, 0.3^2), biases N(0, 0.5^2)); JumpReLU thresholds in
    [0.2, 1], BatchTopK's 0.8, a Switch router bias N(0, 0.1^2). Returns the SAE in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for p in sae.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    if sae.arch == "jumprelu":
        sae.log_theta.copy_(torch.empty(sae.width).uniform_(0.2, 1.0, generator=g).log())
    if sae.arch == "batchtopk":
        sae.theta.fill_(0.8)
    if getattr(sae, "balance_by", None) == "bias":
        sae.router_bias.copy_(torch.randn(sae.n_experts, generator=g) * 0.1)
    return sae.eval()


def make_run(path: Path, sae, store: Path) -> Path:
    """A finished run directory holding `sae` on `store`, written through RunDir."""
    run = RunDir(path)
    run.create()
    run.write_config({"data": {"store": str(store), "eval_frac": EVAL_FRAC, "outlier_factor": None},
                      "model": {"arch": sae.arch}})
    run.write_store(ActivationStore(store))
    run.save_sae(sae)
    run.mark_done({"step": 1, "tokens": 128, "world_size": 1})
    return path


def export_cfg(run: Path, **kw) -> ExportConfig:
    return ExportConfig(**{**dict(run=str(run), format="saelens", out=None, hook_name=None, plugin=True,
                                  overwrite=False), **kw})


def import_cfg(sae: Path, store: Path, out: Path, **kw) -> ImportConfig:
    return ImportConfig(**{**dict(sae=str(sae), store=str(store), out=str(out), eval_frac=EVAL_FRAC,
                                  outlier_factor=None, match_model=True, overwrite=False), **kw})


def lens_load(folder: Path):
    with warnings.catch_warnings():  # our metadata asks for model_from_pretrained_kwargs: SAELens says so
        warnings.simplefilter("ignore", UserWarning)
        return LensSAE.load_from_disk(str(folder))


def dense(codes: Codes, m: int) -> torch.Tensor:
    """Our codes as [B, M]: dense ones as they are, TopK-style ones scattered (padding adds 0)."""
    if codes.dense is not None:
        return codes.dense
    rows = torch.arange(len(codes.idx))[:, None].expand_as(codes.idx)
    return torch.zeros(len(codes.idx), m).index_put_((rows, codes.idx), codes.vals.float(), accumulate=True)


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> dict[str, tuple]:
    """Every case of OURS: (our SAE, its run directory, the exported folder)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for seed, (case, arch, kwargs) in enumerate(OURS):
        sae = randomise(build(arch, d=D, **kwargs), seed)
        run = make_run(root / case, sae, store)
        out[case] = (sae, run, export(export_cfg(run)).out)
    return out


# ------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("case", [c for c, _, _ in OURS])
def test_saelens_loads_every_export_with_our_codes_and_reconstructions(case, exported, store, rows):
    sae, run, folder = exported[case]
    assert folder == run / "saelens"
    lens = lens_load(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == sae.n_latents and cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none"
    assert lens.cfg.metadata.hook_name == HOOK and lens.cfg.metadata.model_name == ActivationStore(store).model
    x = torch.cat([rows, torch.randn(64, D) * 2 + 0.5])  # held-out rows and wider ones
    with torch.no_grad():
        ours = sae.encode(x)
        ours_dense, ours_recon = dense(ours, sae.n_latents), sae.decode(ours)
        theirs = lens.encode(x)
        their_recon = lens.decode(theirs)
    assert (ours_dense != 0).sum(1).float().mean() > 1  # non-trivial codes
    torch.testing.assert_close(theirs, ours_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(their_recon, ours_recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens(x), ours_recon, rtol=1e-5, atol=1e-5)  # SAELens's forward too
    with torch.no_grad():  # [batch, seq, d] inputs, as SAELens hooks hand them over
        torch.testing.assert_close(lens.encode(x.view(2, -1, D)).view(len(x), -1), theirs)


def test_architectures_map_as_documented(exported):
    arch = {case: json.loads((folder / "cfg.json").read_text())["architecture"]
            for case, (_, _, folder) in exported.items()}
    assert arch == {"topk": "topk", "relu": "standard", "gated": "gated", "jumprelu": "jumprelu",
                    "batchtopk": "jumprelu", "switch": "switch", "switch-top2-shared-bias": "switch",
                    "switch-global": "switch", "matryoshka": "jumprelu", "matryoshka-switch": "switch"}
    variant = json.loads((exported["switch-top2-shared-bias"][2] / "cfg.json").read_text())
    assert (variant["active_experts"], variant["shared_width"], variant["shared_k"], variant["router_bias"]) == \
        (2, 8, 2, True)


# ------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("case", [c for c, _, _ in OURS])
def test_export_then_import_gives_the_same_weights(case, exported, store, tmp_path):
    sae, _, folder = exported[case]
    back = import_saelens(import_cfg(folder, store, tmp_path / "back")).sae
    assert back.arch == sae.arch and back.config() == sae.config()  # hyper-parameters travel in metadata.switch_sae
    theirs = back.state_dict()
    for name, value in sae.state_dict().items():
        if name in ("l1_now", "l0_now", "scale", "theta_steps"):  # training state, not the SAE's function
            continue
        torch.testing.assert_close(theirs[name], value, rtol=1e-6, atol=1e-6, msg=f"{case}: {name}")


# ------------------------------------------------------------------------------------------ import

def lens_sae(kind: str, seed: int, **cfg):
    """A SAELens SAE with random weights (thresholds partly below 0 for jumprelu), as SAELens builds it."""
    meta = SAEMetadata(hook_name=HOOK, model_name=cfg.pop("model_name"))
    classes = {"topk": (TopKSAE, TopKSAEConfig), "standard": (StandardSAE, StandardSAEConfig),
               "gated": (GatedSAE, GatedSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}
    cls, config = classes[kind]
    sae = cls(config(d_in=D, d_sae=48, metadata=meta, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (0.6 if name == "threshold" else 0.0))
    return sae


# (case id, SAELens architecture, config fields): both settings of apply_b_dec_to_input are covered,
# so the fold into the encoder bias is checked both ways
LENS = [
    ("topk", "topk", dict(k=5)),
    ("topk-rescaled-no-bdec", "topk", dict(k=5, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)),
    ("standard-bdec", "standard", dict(apply_b_dec_to_input=True)),
    ("gated-no-bdec", "gated", dict(apply_b_dec_to_input=False)),
    ("jumprelu-bdec", "jumprelu", dict(apply_b_dec_to_input=True)),
]


@pytest.mark.parametrize(("case", "kind", "cfg"), LENS, ids=[c for c, _, _ in LENS])
def test_eval_of_an_imported_saelens_sae_equals_its_own_forward(case, kind, cfg, store, rows, tmp_path):
    lens = lens_sae(kind, len(case), model_name=Path(ActivationStore(store).model).name, **cfg)
    lens.save_model(tmp_path / "lens")
    out = tmp_path / "run"
    import_saelens(import_cfg(tmp_path / "lens", store, out))
    result, = evaluate(eval_config(out, max_tokens=10_000, batch_size=16, ce=False))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["mse"] == result["mse"] and saved["eval_tokens"] == len(rows) == 32
    with torch.no_grad():
        codes, recon = lens.encode(rows), lens(rows)
    err = (rows - recon).double()
    x = rows.double()
    expect = {"mse": err.pow(2).sum(1).mean().item(),
              "nmse": err.pow(2).sum().item() / (x - x.mean(0)).pow(2).sum().item(),
              "fve": 1 - err.var(0, correction=0).sum().item() / x.var(0, correction=0).sum().item(),
              "l0": (codes > 0).sum(1).double().mean().item()}
    assert 0 < expect["l0"] < 48
    for key, value in expect.items():
        assert saved[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
def test_geometry_and_dashboard_take_an_imported_run(store, tmp_path, monkeypatch, capsys):
    lens = lens_sae("jumprelu", 1, model_name=None)
    lens.save_model(tmp_path / "lens")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process("interop.import_saelens", [f"sae={tmp_path / 'lens'}", f"store={store}", f"out={out}",
                                                          f"eval_frac={EVAL_FRAC}"], capsys)
    assert code == 0, err
    assert (out / "done.json").exists() and RunDir(out).read_config()["model"]["arch"] == "jumprelu"
    code, err = run_in_process("eval.geometry", [f"run={out}", "tsne=false", "device=cpu"], capsys)
    assert code == 0, err
    assert json.loads((out / "geometry.json").read_text())["n_latents"] == 48
    code, err = run_in_process("eval.dashboard", [f"run={out}", "n_features=3", "progress=false", "device=cpu"],
                               capsys)
    assert code == 0, err
    assert (out / "dashboard" / "index.html").exists()


# ------------------------------------------------------------------------------------------ bad input

def lens_folder(path: Path, store: Path, *, weights: dict | None = None, **changes) -> Path:
    """A SAELens topk folder (saved by SAELens) with cfg.json fields changed: metadata.<key> for keys of
    the metadata, top-level otherwise; `weights` replaces the weights file's tensors."""
    from safetensors.torch import save_file

    sae = lens_sae("topk", 0, k=4, model_name=Path(ActivationStore(store).model).name)
    sae.save_model(path)
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        (cfg["metadata"] if key in ("hook_name", "model_name", "hook_head_index") else cfg)[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))
    if weights is not None:
        save_file(weights, path / "sae_weights.safetensors")
    return path


def check_one_line(code: int, err: str, app: str, expect: str) -> None:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"{app}: error: ") and expect in lines[0], lines[0]


IMPORT_CASES = [  # (case, folder changes, extra arguments, what the line says)
    ("not-a-folder", None, [], "is not a SAELens SAE folder: no cfg.json and no sae_weights.safetensors"),
    ("abstopk", dict(architecture="abstopk"), [], "is a SAELens 'abstopk' SAE, which has no counterpart here"),
    ("d_in", dict(d_in=16), [], "has d_in=16 but store"),
    ("other-layer", dict(hook_name="blocks.3.hook_resid_post"), [],
     "reads blocks.3.hook_resid_post (block 3 resid_post) but store"),
    ("other-hook", dict(hook_name="blocks.2.hook_resid_mid"), [], "reads blocks.2.hook_resid_mid, which is no site"),
    ("layer-norm", dict(normalize_activations="layer_norm"), [], "normalize_activations='layer_norm'"),
    ("scaled", dict(normalize_activations="expected_average_only_in"), [], "fold_activation_norm_scaling_factor"),
    ("head", dict(hook_head_index=1), [], "reads single attention heads"),
    ("model", dict(model_name="gpt2"), [], "was made for model 'gpt2' but store"),
    ("weights", "weights", [], "the weights are W_dec, W_enc, b_dec but a SAELens topk SAE has"),
    ("nan", "nan", [], "sae_weights.safetensors holds non-finite values: W_dec (32 values); nothing imported"),
    ("eval_frac", {}, ["eval_frac=0.9"], "eval_frac must be a number in (0, 0.5], got 0.9"),
    ("typo", {}, ["match_modle=false"], "unknown key 'match_modle'; did you mean 'match_model'?"),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("case", "changes", "args", "expect"), IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_import_refuses_in_one_line(case, changes, args, expect, store, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "lens"
    if changes == "weights":
        lens_folder(folder, store, weights={"W_enc": torch.zeros(D, 48), "W_dec": torch.zeros(48, D),
                                            "b_dec": torch.zeros(D)})
    elif changes == "nan":  # one decoder row of NaN, as a diverged training run leaves it
        from safetensors.torch import load_file

        weights = load_file(lens_folder(folder, store) / "sae_weights.safetensors")
        weights["W_dec"][3] = float("nan")
        lens_folder(folder, store, weights=weights)
    elif changes is None:
        folder.mkdir()
    else:
        lens_folder(folder, store, **changes)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    # the default eval_frac 0.05 holds out none of the store's 8 chunks
    frac = [] if any(a.startswith("eval_frac=") for a in args) else [f"eval_frac={EVAL_FRAC}"]
    code, err = run_in_process("interop.import_saelens",
                               [f"sae={folder}", f"store={store}", f"out={tmp_path / 'run'}", *frac, *args], capsys)
    check_one_line(code, err, "import_saelens", expect)
    assert files(tmp_path) == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_export_refuses_in_one_line(exported, tmp_path, monkeypatch, capsys):
    switch_run, topk_run = exported["switch"][1], exported["topk"][1]
    synthetic = synthetic_store(tmp_path / "synthetic", n_chunks=2, d=D)  # site 'none': no hook name
    odd = make_run(tmp_path / "odd", randomise(build("topk", d=D, width=64, k=4), 0), synthetic)
    cases = [
        ([f"run={switch_run}", "plugin=false", f"out={tmp_path / 'x'}"],
         ("is a Switch SAE, which stock SAELens cannot load: plugin=true writes it with our SAELens plugin module "
          "saelens_switch.py beside it")),
        ([f"run={odd}", f"out={tmp_path / 'x'}"], "site 'none' has no TransformerLens hook name"),
        ([f"run={tmp_path / 'nowhere'}"], f"run {tmp_path / 'nowhere'} does not exist"),
        ([f"run={topk_run}"], f"out {topk_run / 'saelens'} is not empty; overwrite=true"),
        ([f"run={topk_run}", "format=onnx"], "format must be saelens, got 'onnx'"),
        ([f"run={topk_run}", "formt=saelens"], "unknown key 'formt'; did you mean 'format'?"),
        (["format=saelens"], "run=<run dir> is required"),
    ]
    monkeypatch.chdir(tmp_path)
    for args, expect in cases:
        before = files(tmp_path) + files(topk_run)
        code, err = run_in_process("interop.export", args, capsys)
        check_one_line(code, err, "export", expect)
        assert files(tmp_path) + files(topk_run) == before
    # the same odd run with the hook named by hand is exported
    code, err = run_in_process("interop.export", [f"run={odd}", "hook_name=blocks.0.hook_resid_post"], capsys)
    assert code == 0, err
    assert lens_load(odd / "saelens").cfg.metadata.hook_name == "blocks.0.hook_resid_post"


def test_the_real_export_cli_writes_the_plugin_and_saelens_alone_loads_it(exported, tmp_path):
    """`python -m interop.export` as a process on a Switch run writes the folder with the plugin module beside
    cfg.json; a separate interpreter that imports only that module and sae_lens (none of this project)
    loads the SAE and encodes k latents per token."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "interop.export", f"run={exported['switch'][1]}", "format=saelens",
                          f"out={tmp_path / 'sw'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "import saelens_switch" in out.stdout and "'switch'" in out.stdout
    folder = tmp_path / "sw"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", "saelens_switch.py"]
    assert (folder / "saelens_switch.py").read_bytes() == (ROOT / "interop" / "saelens_switch.py").read_bytes()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
    user = tmp_path / "elsewhere"
    user.mkdir()
    script = (f"import sys; sys.path.insert(0, {str(folder)!r}); import saelens_switch, torch; "
              f"from sae_lens import SAE; sae = SAE.load_from_disk({str(folder)!r}); "
              "codes = sae.encode(torch.randn(5, sae.cfg.d_in)); "
              "ours = [m for m in sys.modules if m.split('.')[0] in ('interop', 'train', 'eval', 'harvest', 'runtime')]; "
              "import json; print(json.dumps([ours, (codes != 0).sum(-1).tolist()]))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", script], cwd=user, env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    k = json.loads((folder / "cfg.json").read_text())["k"]
    ours, active = json.loads(loaded.stdout)
    assert ours == [] and len(active) == 5 and all(1 <= a <= k for a in active), loaded.stdout


def test_the_plugin_is_self_contained():
    """The plugin imports only torch and sae_lens (a SAELens user copies the one file)."""
    source = (ROOT / "interop" / "saelens_switch.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports == {"__future__", "dataclasses", "torch", "sae_lens"}


def test_hook_names_follow_transformer_lens():
    from interop.saelens_format import SAELensFormatError, hook_name, normalise_config, parse_hook

    assert hook_name(8, "resid_post") == "blocks.8.hook_resid_post"  # the paper's GPT-2 site
    assert [hook_name(3, site) for site in ("attn_out", "mlp_out")] == ["blocks.3.hook_attn_out",
                                                                         "blocks.3.hook_mlp_out"]
    assert hook_name(3, "mlp_in") == "blocks.3.hook_mlp_in" and parse_hook("blocks.3.hook_mlp_in") == (3, "mlp_in")
    with pytest.raises(SAELensFormatError, match="site 'mlp_mid' has no TransformerLens hook name"):
        hook_name(3, "mlp_mid")
    assert parse_hook("blocks.8.hook_resid_post") == parse_hook("blocks.9.hook_resid_pre") == (8, "resid_post")
    assert parse_hook("blocks.0.hook_resid_pre") is None and parse_hook("blocks.8.attn.hook_z") is None
    # a config of SAELens before 6.0, read as SAELens 6 reads it
    old = normalise_config({"d_in": 768, "d_sae": 24576, "hook_point": "blocks.8.hook_resid_post",
                            "model_name": "gpt2", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 32},
                            "normalize_activations": False})
    assert (old["architecture"], old["k"], old["apply_b_dec_to_input"], old["normalize_activations"]) == \
        ("topk", 32, True, "none")
    assert old["metadata"]["hook_name"] == "blocks.8.hook_resid_post" and old["metadata"]["model_name"] == "gpt2"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
def test_an_import_into_a_run_being_trained_is_refused_and_the_run_resumes_exactly(store, tmp_path, monkeypatch,
                                                                                  capsys):
    """Real processes: `python -m train` holds its run folder; `import_saelens out=<that run>
    overwrite=true` is refused in one line naming the trainer and writes nothing there; the trainer,
    killed, then resumes to the same weights as an undisturbed run of the same config."""
    from runtime.config import compose_app
    from tests.train.test_loop import assert_same_weights
    from train.config import TrainConfig
    from train.loop import train

    keys = [f"data.store={store}", "model=topk", "model.width=48", "model.k=4", "budget=steps:3000", "batch_size=32",
            "lr=0.001", "log_every=100", "checkpoint_every=100", "eval_every=0", "progress=false", "device=cpu",
            f"data.eval_frac={EVAL_FRAC}", "data.window_chunks=2", "data.outlier_factor=null"]
    run = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-m", "train", *keys, f"hydra.run.dir={run}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / RunDir.CHECKPOINT).exists() and trainer.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert trainer.poll() is None, "the trainer ended before the import could start"
        before = {name: (run / name).read_bytes() for name in (RunDir.CONFIG, RunDir.STORE)}
        lens = lens_folder(tmp_path / "lens", store, model_name=Path(ActivationStore(store).model).name)
        monkeypatch.chdir(tmp_path)
        code, err = run_in_process("interop.import_saelens", [f"sae={lens}", f"store={store}", f"out={run}",
                                                              f"eval_frac={EVAL_FRAC}", "overwrite=true"], capsys)
        assert trainer.poll() is None, "the trainer ended before the import was refused"
        check_one_line(code, err, "import_saelens", f"run {run} is being written by another process: pid {trainer.pid} on ")
        assert {name: (run / name).read_bytes() for name in before} == before
        assert not (run / RunDir.DONE).exists() and not (run / RunDir.SAE).exists()
    finally:
        trainer.kill()
        trainer.wait()
    assert not RunDir(run).finished
    cfg = TrainConfig.from_omegaconf(compose_app("train", keys))
    train(cfg, run)  # resumes from its last checkpoint
    train(cfg, tmp_path / "straight")
    assert_same_weights(tmp_path / "straight" / RunDir.SAE, run / RunDir.SAE)


FIELD_VALUES = [1.5, "text", [1], {"a": 1}, True, -3]  # a value of every JSON type (and a negative number)


def _malformed_fields():
    """(field, value) pairs: every field the import reads given every value its rule refuses."""
    from interop.saelens_format import FIELDS

    for key, rule in FIELDS.items():
        for value in FIELD_VALUES:
            if not rule.ok(value):
                yield key, value


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
def test_every_cfg_json_field_of_the_wrong_type_is_refused_naming_it(store, tmp_path, monkeypatch, capsys):
    """cfg.json is parsed into typed fields at the boundary (`read_config`): a value of the wrong type
    for any field the import reads is refused naming the file and the field; one of them also through
    the CLI, in one line with nothing written."""
    from interop.saelens_format import SAELensFormatError, read_config

    folder = lens_folder(tmp_path / "lens", store, model_name=Path(ActivationStore(store).model).name)
    good = json.loads((folder / "cfg.json").read_text())
    cases = list(_malformed_fields())
    assert len(cases) > 60
    for key, value in cases:
        cfg = json.loads(json.dumps(good))
        node, *rest = key.split(".")
        (cfg["metadata"] if rest else cfg)[rest[0] if rest else node] = value
        (folder / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(SAELensFormatError, match=f"^{re.escape(str(folder / 'cfg.json'))}: {re.escape(key)} must be "):
            read_config(folder)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    code, err = run_in_process("interop.import_saelens", [f"sae={folder}", f"store={store}", f"out={tmp_path / 'run'}",
                                                          f"eval_frac={EVAL_FRAC}"], capsys)
    check_one_line(code, err, "import_saelens", f"{folder / 'cfg.json'}: {cases[-1][0]} must be ")
    assert files(tmp_path) == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
@pytest.mark.parametrize(("changes", "expect"), [
    (dict(n_experts=0), "n_experts must be an integer >= 1 or null, got 0"),
    (dict(n_experts=4, shared_width=48), "has d_sae=48, shared_width=48 and n_experts=4: the 0 routed latents"),
    (dict(n_experts=5), "has d_sae=48, shared_width=0 and n_experts=5: the 48 routed latents do not split"),
], ids=["zero-experts", "shared-too-wide", "uneven"])
def test_switch_sizes_that_do_not_fit_are_one_line(changes, expect, store, tmp_path, monkeypatch, capsys):
    folder = lens_folder(tmp_path / "lens", store, model_name=Path(ActivationStore(store).model).name,
                         architecture="switch", **changes)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    code, err = run_in_process("interop.import_saelens", [f"sae={folder}", f"store={store}", f"out={tmp_path / 'run'}",
                                                          f"eval_frac={EVAL_FRAC}"], capsys)
    check_one_line(code, err, "import_saelens", expect)
    assert files(tmp_path) == before
