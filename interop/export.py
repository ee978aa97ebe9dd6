"""`python -m interop.export run=<run dir> format=saelens [out=<dir>]`: a trained SAE as a SAELens folder.

Writes `<out>/cfg.json` and `<out>/sae_weights.safetensors` (default out: `<run>/saelens`), which
`sae_lens.SAE.load_from_disk(out)` loads with the same codes and reconstructions as our SAE (the
weight maps: each architecture's `to_saelens`, dispatched by interop/saelens_arch.py). A Switch SAE is
written as the architecture "switch", which SAELens knows once our plugin is imported: the export writes
the plugin module itself beside cfg.json (`<out>/saelens_switch.py`, a copy of interop/saelens_switch.py,
which needs only torch and sae_lens), so the folder loads with SAELens alone (plugin=false refuses
Switch runs instead).
Keys: conf/interop/export.yaml. What cfg.json holds:

    d_in, d_sae, dtype          the SAE's input width, latents, float32
    apply_b_dec_to_input, ...   per architecture (saelens_arch)
    normalize_activations       none: our SAEs read the store's activations as they are (the loader
                                neither rescales nor centres them; outlier rows are left out of
                                training and eval, which no SAELens field expresses)
    metadata.model_name         the store's model (hub id or local folder)
    metadata.hook_name          TransformerLens name of the store's layer and site (saelens_format.HOOKS)
    metadata.context_size       the store's context size; seqpos_slice [first_pos, null] (position 0 was
                                not stored unless the harvest kept it)
    metadata.model_from_pretrained_kwargs   {center_writing_weights: false}: our activations are those of
                                the unprocessed Hugging Face model, which TransformerLens gives with it
    metadata.switch_sae         our architecture, constructor config, model keys, run and store identity

Bad input is one line (`export: error: ...`, exit code 2) before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from runtime.cli import launch
from runtime.config import FLAG, NULL, one_of, text, typed_config
from runtime.errors import ToolkitError, one_line_errors, reraise_as

FORMATS = ("saelens",)
DEFAULT_OUT = "saelens"  # <run>/saelens when out is null
PLUGIN = Path(__file__).with_name("saelens_switch.py")  # written beside cfg.json for SAEs that need it

RULES = {
    "run": text("a path"),
    "format": one_of(*FORMATS),
    "out": text("a path") | NULL,
    "hook_name": text("a hook name like blocks.8.hook_resid_post") | NULL,
    "plugin": FLAG,
    "overwrite": FLAG,
}


class ExportError(ToolkitError):
    """Bad input; printed as one line before anything is written."""


@dataclass(frozen=True)
class ExportConfig:
    """conf/interop/export.yaml (every key documented there)."""

    run: str
    format: str
    out: str | None
    hook_name: str | None
    plugin: bool
    overwrite: bool

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> ExportConfig:
        """The typed config of a composed conf/interop/export.yaml, every value checked; ExportError in one line."""
        return typed_config(cls, cfg, ExportError, "export", "conf/interop/export.yaml", RULES,
                            required={"run": "run=<run dir> is required: a training run directory holding sae/"})


@dataclass
class Export:
    """What `plan` decided: the folder, its cfg.json and weights, and what to tell the user."""

    out: Path
    config: dict[str, Any]
    tensors: dict[str, Any]
    message: str
    plugin: bool = False  # write the SAELens plugin module beside cfg.json


def store_identity(run: Any) -> dict[str, Any]:
    """The identity of the run's store (model, layer, site, d_model, ...): store.json, else the store itself."""
    from harvest.store import ActivationStore

    identity = run.read_store()
    if identity is not None:
        return identity
    path = run.run_config().store if run.has_config else None
    try:
        return ActivationStore(path).identity()
    except (FileNotFoundError, TypeError):
        raise ExportError(f"run {run.path} records no store ({run.STORE}) and its data.store {path} is not an "
                          "activation store: the SAE's model and hook cannot be named") from None


def saelens_config(exported: Any, sae: Any, identity: dict[str, Any], hook: str, run: Any) -> dict[str, Any]:
    """cfg.json of the export (module docstring)."""
    from interop.saelens_format import METADATA_KEY, format_version

    version = format_version()
    config = run.run_config() if run.has_config else None
    ours = {"arch": sae.arch, "config": sae.config(), "model": config and config.model, "run": str(run.path),
            "store": identity, "outlier_factor": config and config.outlier_factor,
            "exported_by": "python -m interop.export"}
    metadata = {"sae_lens_version": version, "sae_lens_training_version": version,
                "model_name": identity["model"], "hook_name": hook, "hook_head_index": None,
                "context_size": identity["context_size"], "seqpos_slice": [identity["first_pos"], None],
                "model_from_pretrained_kwargs": {"center_writing_weights": False}, METADATA_KEY: ours}
    return {"d_in": sae.d, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
            "normalize_activations": "none", "reshape_activations": "none", **exported.fields,
            "architecture": exported.architecture, "metadata": metadata}


def plan(cfg: ExportConfig) -> Export:
    """Every check, nothing written: the run, its SAE, the hook name, the architecture, the out folder."""
    from interop.saelens_arch import to_saelens
    from interop.saelens_format import hook_name
    from train.run_dir import RunDir

    with reraise_as(ExportError):
        run = RunDir(cfg.run)
        run.check_trained()
        sae = run.load_sae("cpu")
        identity = store_identity(run)
        if identity["d_model"] != sae.d:
            raise ExportError(f"run {run.path}'s SAE reads d={sae.d} activations but its store {identity['path']} "
                              f"has d={identity['d_model']}")
        hook = cfg.hook_name or hook_name(identity["layer"], identity["site"])
        exported = to_saelens(sae)
    if exported.needs_plugin and not cfg.plugin:
        raise ExportError(f"run {run.path} is a {sae.display_name} SAE, which stock SAELens cannot load: plugin=true "
                          f"writes it with our SAELens plugin module {PLUGIN.name} beside it")
    out = Path(cfg.out) if cfg.out else run.path / DEFAULT_OUT
    if out.exists() and not out.is_dir():
        raise ExportError(f"out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ExportError(f"out {out} is not empty; overwrite=true replaces its files, or choose another out=")
    load = f"sae_lens.SAE.load_from_disk({str(out)!r})"
    message = (f"wrote {out}: SAELens architecture {exported.architecture!r} (ours: {sae.arch}), hook {hook}; "
               f"load it with {load}")
    if exported.needs_plugin:
        message += (f" after importing the plugin module written beside it, {out / PLUGIN.name} "
                    f"(`sys.path.insert(0, {str(out)!r}); import {PLUGIN.stem}`), which registers "
                    f"{exported.architecture!r}")
    return Export(out, saelens_config(exported, sae, identity, hook, run), exported.tensors, message,
                  exported.needs_plugin)


def export(cfg: ExportConfig) -> Export:
    """Check everything (`plan`), then write the folder; returns what was written."""
    from interop.saelens_format import write_folder
    from runtime.files import write_atomic

    done = plan(cfg)
    write_folder(done.out, done.config, done.tensors)
    if done.plugin:
        code = PLUGIN.read_bytes()
        write_atomic(done.out / PLUGIN.name, lambda f: f.write(code))
    return done


@hydra.main(config_path="../conf/interop", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `export: error: ...` and exit 2 on bad input."""
    with one_line_errors("export"):
        done = export(ExportConfig.from_omegaconf(cfg))
    print(done.message)


if __name__ == "__main__":
    launch("export", main, ExportConfig.from_omegaconf, conf="interop")
