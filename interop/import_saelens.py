"""`python -m interop.import_saelens sae=<SAELens folder> store=<our store> out=<run dir>`: a SAELens SAE
as one of our runs, which eval, geometry and dashboards take unchanged.

The folder's cfg.json and weights are read directly (saelens_format; sae_lens itself is not imported)
and mapped onto our architecture (each architecture declares the SAELens ones it takes; saelens_arch
dispatches: topk -> topk, standard -> relu, gated -> gated, jumprelu -> jumprelu, or batchtopk for a
folder we exported from one, switch -> switch), exactly: where
SAELens subtracts b_dec before the encoder and ours does not (or the reverse), the difference is
folded into the encoder bias. The run directory written (train/run_dir.py writes every file):

    sae/              our SAE (sae.json + sae.safetensors)
    config.yaml       data.store / eval_frac / outlier_factor (what eval reads), model (our arch's keys:
                      the sizes from the SAELens config, training hyper-parameters from the folder's
                      metadata.switch_sae when we exported it, else conf/train/model/<arch>.yaml's
                      defaults; they do not change the SAE's output), imported (where it came from)
    store.json        the store's identity
    done.json         step 0, tokens 0 (it was not trained here), imported_from

Refused in one line (`import_saelens: error: ...`, exit 2) before anything is written: a folder that is
not a SAELens SAE, an architecture with no counterpart here, weights that do not fit the config, a d_in
other than the store's d_model, a hook_name that is not the store's layer and site, a model_name that is
not the store's (match_model=false accepts it), per-head or hook_z SAEs, and every normalize_activations
other than none (expected_average_only_in: the scaling factor lives outside the folder;
constant_norm_rescale, layer_norm: a per-token rescaling our SAEs do not have; covariance_whitening: a
whitening SAELens folds into the weights before saving, so a folder that still names it is unfolded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from runtime.cli import launch
from runtime.config import FLAG, NULL, number, text, typed_config
from runtime.errors import ToolkitError, one_line_errors, reraise_as

RULES = {
    "sae": text("a path"),
    "store": text("a path"),
    "out": text("a path"),
    "eval_frac": number(0, 0.5, lo_open=True),
    "outlier_factor": number(1, lo_open=True) | NULL,
    "match_model": FLAG,
    "overwrite": FLAG,
}
# normalize_activations SAELens may name -> why we cannot reproduce it (none is the only one we can)
NORMALISATIONS = {
    "expected_average_only_in": "its inputs are scaled by a factor SAELens keeps outside the folder (fold it in "
                                "with sae.fold_activation_norm_scaling_factor(factor) and save the SAE again)",
    "constant_norm_rescale": "every token is rescaled to norm sqrt(d_in) before encoding and back after decoding, "
                             "which our SAEs do not do",
    "layer_norm": "every token is layer-normalised before encoding and un-normalised after decoding, which our SAEs "
                  "do not do",
    "covariance_whitening": "its inputs are whitened by statistics that are not in the folder (SAELens folds them into "
                            "the weights when it saves a finished SAE)",
}


class SAELensImportError(ToolkitError):
    """Bad input; printed as one line before anything is written."""


@dataclass(frozen=True)
class ImportConfig:
    """conf/interop/import_saelens.yaml (every key documented there)."""

    sae: str
    store: str
    out: str
    eval_frac: float
    outlier_factor: float | None
    match_model: bool
    overwrite: bool

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> ImportConfig:
        """The typed config of a composed conf/interop/import_saelens.yaml, every value checked; one line."""
        required = {key: f"{key}=<{what}> is required" for key, what in
                    (("sae", "a SAELens SAE folder"), ("store", "our activation store"), ("out", "a run directory"))}
        return typed_config(cls, cfg, SAELensImportError, "import_saelens", "conf/interop/import_saelens.yaml", RULES,
                            required=required)


@dataclass
class Import:
    """What `plan` built: where it goes, our SAE, its model keys, where it came from, the import's config,
    the store and the SAELens architecture."""

    out: Path
    sae: Any
    model: dict[str, Any]
    source: dict[str, Any]
    cfg: ImportConfig
    store: Any
    saelens_arch: str


# ------------------------------------------------------------------------------------------ checks

def check_config(cfg: dict[str, Any], folder: str) -> None:
    """SAELensImportError unless our architectures can reproduce the SAELens config's SAE exactly."""
    from interop.saelens_arch import ArchError
    from interop.saelens_arch import check_config as check_architecture

    try:
        check_architecture(cfg)
    except ArchError as e:
        raise SAELensImportError(f"{folder} {e}") from None
    mode = cfg["normalize_activations"]
    if mode != "none":
        why = NORMALISATIONS.get(mode, "an activation normalisation this toolkit does not know")
        raise SAELensImportError(f"{folder} has normalize_activations={mode!r}: {why}; only 'none' is imported")
    meta = cfg["metadata"]
    if cfg["reshape_activations"] != "none" or meta.get("hook_head_index") is not None:
        raise SAELensImportError(f"{folder} reads single attention heads (hook_z / hook_head_index), not a site our "
                                 "stores hold")


def check_store(cfg: dict[str, Any], folder: str, store: Any, match_model: bool) -> None:
    """SAELensImportError unless the SAE reads the store's activations: d_in, hook (layer and site), model."""
    from interop.saelens_format import parse_hook

    if cfg["d_in"] != store.d_model:
        raise SAELensImportError(f"{folder} has d_in={cfg['d_in']} but store {store.path} has d_model={store.d_model}")
    meta = cfg["metadata"]
    hook = meta.get("hook_name")
    if not hook:
        raise SAELensImportError(f"{folder} names no hook_name in its cfg.json metadata: which activations it reads is "
                                 "unknown")
    site = parse_hook(hook)
    if site is None:
        raise SAELensImportError(f"{folder} reads {hook}, which is no site our stores hold "
                                 "(blocks.<layer>.hook_resid_post, hook_attn_out, hook_mlp_out)")
    if site != (store.layer, store.site):
        raise SAELensImportError(f"{folder} reads {hook} (block {site[0]} {site[1]}) but store {store.path} holds "
                                 f"block {store.layer} {store.site}")
    model = meta.get("model_name")
    if match_model and model and model not in (store.model, Path(store.model).name):
        raise SAELensImportError(f"{folder} was made for model {model!r} but store {store.path} holds {store.model!r} "
                                 "activations; match_model=false imports it anyway")


def check_out(out: Path, overwrite: bool) -> None:
    from train.run_dir import RunDir

    if out.exists() and not out.is_dir():
        raise SAELensImportError(f"out {out} is a file, not a run directory")
    if out.is_dir() and any(p.name != RunDir.LOCK for p in out.iterdir()) and not overwrite:
        raise SAELensImportError(f"out {out} is not empty; overwrite=true writes into it, or choose another out=")


# ------------------------------------------------------------------------------------------ building

def model_keys(arch: str, sizes: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Our `model` config block: conf/train/model/<arch>.yaml's defaults; over them what we exported with the
    SAE (metadata.switch_sae, same architecture only: its constructor config, then the run's model keys),
    for the keys the YAML has; then the sizes the weights fix."""
    from interop.saelens_format import METADATA_KEY
    from train.saes.base import model_yaml

    keys = {key: value for key, value in model_yaml(arch).items() if key != "arch"}
    ours = meta.get(METADATA_KEY) or {}
    if ours.get("arch") == arch:
        for exported in (ours.get("config"), ours.get("model")):
            if isinstance(exported, dict):
                keys.update({key: value for key, value in exported.items() if key in keys})
    keys.update(sizes)
    return {"arch": arch, **keys}


def build(imported: Any, model: dict[str, Any], d: int, folder: str) -> Any:
    """Our SAE (eval mode) of `model` with the imported state entries set; SAELensImportError when they do not fit."""
    from train.saes import REGISTRY
    from train.saes import build as build_sae

    keys = {key: value for key, value in model.items() if key != "arch"}
    try:
        sae = build_sae(imported.arch, **REGISTRY[imported.arch].constructor_kwargs(keys, d))
    except ValueError as e:
        raise SAELensImportError(f"{folder} gives a {imported.arch} SAE we cannot build: {e}") from None
    state = sae.state_dict()
    for name, value in imported.state.items():
        if name not in state or state[name].shape != value.shape:
            raise SAELensImportError(f"{folder}: weight {name} of shape {list(value.shape)} does not fit our "
                                     f"{imported.arch} SAE")
        state[name] = value.to(state[name].dtype)
    sae.load_state_dict(state)
    return sae.eval()


def plan(cfg: ImportConfig) -> Import:
    """Every check and the conversion, nothing written."""
    from harvest.held_out import split_chunks
    from harvest.store import ActivationStore
    from interop.saelens_arch import from_saelens
    from interop.saelens_format import WEIGHTS, read_config, read_weights
    from train.saes import nonfinite

    folder = cfg.sae
    with reraise_as(SAELensImportError):
        saelens = read_config(folder)
        check_config(saelens, folder)
        try:
            store = ActivationStore(cfg.store)
        except FileNotFoundError:
            raise SAELensImportError(f"store {cfg.store} is not an activation store") from None
        check_store(saelens, folder, store, cfg.match_model)
        out = Path(cfg.out)
        check_out(out, cfg.overwrite)
        if not split_chunks(store.n_chunks, cfg.eval_frac)[1]:
            raise SAELensImportError(f"store {cfg.store} has no held-out chunk at eval_frac={cfg.eval_frac} "
                                     f"({store.n_chunks} chunks): eval would have no rows")
        tensors = read_weights(folder)
        bad = nonfinite(tensors)
        if bad:
            raise SAELensImportError(f"{Path(folder) / WEIGHTS} holds non-finite values: {bad}; nothing imported")
        imported = from_saelens(saelens, tensors)
        model = model_keys(imported.arch, imported.sizes, saelens["metadata"])
        sae = build(imported, model, saelens["d_in"], folder)
    source = {"format": "saelens", "folder": str(folder), "architecture": saelens["architecture"],
              "hook_name": saelens["metadata"].get("hook_name"), "model_name": saelens["metadata"].get("model_name"),
              "apply_b_dec_to_input": saelens["apply_b_dec_to_input"]}
    return Import(out, sae, model, source, cfg, store, saelens["architecture"])


def write_run(done: Import) -> None:
    """The run directory, through RunDir's writers; done.json last (it marks the run finished)."""
    from train.run_dir import RunDir

    run = RunDir(done.out)
    run.create()
    run.write_import_config(str(done.cfg.store), done.cfg.eval_frac, done.cfg.outlier_factor, done.model, done.source)
    run.write_store(done.store)
    run.save_sae(done.sae)
    run.mark_done({"step": 0, "tokens": 0, "world_size": 1, "imported_from": done.source["folder"]})


def import_saelens(cfg: ImportConfig) -> Import:
    """Check and convert (`plan`), then write the run directory holding its lock (a run being trained,
    or imported by another launch, is refused in one line); returns what was written."""
    from train.run_dir import RunDir

    done = plan(cfg)
    with RunDir(done.out).writer_lock(f"run {done.out}", SAELensImportError):
        check_out(done.out, cfg.overwrite)  # again, now that no other launch can write there
        write_run(done)
    return done


@hydra.main(config_path="../conf/interop", config_name="import_saelens", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `import_saelens: error: ...` and exit 2 on bad input."""
    with one_line_errors("import_saelens"):
        done = import_saelens(ImportConfig.from_omegaconf(cfg))
    print(f"imported {done.source['folder']} (SAELens {done.saelens_arch}) as our {done.sae.arch} SAE into "
          f"{done.out}; evaluate it with `python -m eval run={done.out}`")


if __name__ == "__main__":
    launch("import_saelens", main, ImportConfig.from_omegaconf, conf="interop", name="import_saelens")
