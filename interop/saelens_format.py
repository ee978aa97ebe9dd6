"""THE SAELens folder format, as far as this toolkit reads and writes it, without importing sae_lens.

A SAELens SAE folder (what `SAE.save_model(path)` writes and `SAE.load_from_disk(path)` reads, SAELens 6):

    cfg.json                  the config: d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, architecture, the
                              architecture's own fields (e.g. k) and `metadata` (model_name, hook_name,
                              hook_head_index, context_size, ... and sae_lens_version)
    sae_weights.safetensors   the weights; SAELens orientation: W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                              b_dec [d_in], plus the architecture's own (b_enc, threshold, b_gate, ...)

Importing sae_lens costs seconds (it loads TransformerLens), so export and import read and write these
two files directly; the tests load every exported folder with SAELens itself.

Configs of SAELens before 6.0 (no `metadata`, `hook_point` for `hook_name`, `activation_fn: topk`) are
read the way SAELens 6 reads them (`normalise_config`).

Hook names follow TransformerLens: the output of block L (our site resid_post) is
`blocks.L.hook_resid_post`, which is also `blocks.{L+1}.hook_resid_pre`; attention and MLP outputs are
`blocks.L.hook_attn_out` and `blocks.L.hook_mlp_out`.
"""

from __future__ import annotations

import json
import re
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from runtime.config import FLAG, NULL, Rule, integer, show, text
from runtime.errors import ToolkitError
from runtime.files import read_text_file, write_atomic, write_json

CONFIG = "cfg.json"  # SAELens's SAE_CFG_FILENAME
WEIGHTS = "sae_weights.safetensors"  # SAELens's SAE_WEIGHTS_FILENAME
FORMAT_VERSION = "6.0.0"  # the SAELens config format written, when sae-lens itself is not installed
METADATA_KEY = "switch_sae"  # our own block inside metadata: the architecture and config we exported

# our store sites -> TransformerLens hook name of block L
HOOKS = {"resid_post": "blocks.{layer}.hook_resid_post",
         "attn_out": "blocks.{layer}.hook_attn_out",
         "mlp_in": "blocks.{layer}.hook_mlp_in",
         "mlp_out": "blocks.{layer}.hook_mlp_out"}
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|attn_out|mlp_in|mlp_out)")


class SAELensFormatError(ToolkitError):
    """A folder that is not a SAELens SAE, or a hook we cannot name; one line."""


# ------------------------------------------------------------------------------------------ hooks

def hook_name(layer: int, site: str) -> str:
    """The TransformerLens hook name of our (layer, site): `blocks.8.hook_resid_post` for (8, resid_post)."""
    if site not in HOOKS:
        raise SAELensFormatError(f"site {site!r} has no TransformerLens hook name (sites that have one: "
                                 f"{', '.join(HOOKS)}); name the hook yourself with hook_name=")
    return HOOKS[site].format(layer=layer)


def parse_hook(name: str) -> tuple[int, str] | None:
    """(layer, site) our stores would hold for a TransformerLens hook name, or None for any other hook.
    `blocks.{L+1}.hook_resid_pre` is the output of block L: (L, resid_post)."""
    found = _HOOK.fullmatch(name or "")
    if not found:
        return None
    layer, kind = int(found.group(1)), found.group(2)
    if kind == "resid_pre":
        return (layer - 1, "resid_post") if layer > 0 else None  # blocks.0.hook_resid_pre is the embedding
    return layer, kind


# ------------------------------------------------------------------------------------------ reading

def is_folder(path: str | Path) -> bool:
    """Whether `path` holds both files of a SAELens SAE."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


ABSENT = object()  # a field cfg.json does not have
# every cfg.json field this toolkit reads (after `normalise_config`) and what it must be when present;
# architecture-specific fields are required where they are used (each architecture's
# `check_saelens_config`)
FIELDS: dict[str, Rule] = {
    "architecture": text("a SAELens architecture name"),
    "apply_b_dec_to_input": FLAG,
    "normalize_activations": text("a SAELens normalisation name"),
    "reshape_activations": text("a SAELens reshape name"),
    "rescale_acts_by_decoder_norm": FLAG | NULL,
    "k": integer(1) | NULL,
    "n_experts": integer(1) | NULL,
    "active_experts": integer(1),
    "shared_width": integer(0),
    "shared_k": integer(0),
    "router_bias": FLAG | NULL,
    "metadata.hook_name": text("a hook name like blocks.8.hook_resid_post") | NULL,
    "metadata.model_name": text("a model name") | NULL,
    "metadata.hook_head_index": integer(0) | NULL,
}


def read_config(path: str | Path) -> dict[str, Any]:
    """cfg.json of the SAELens folder at `path`, in SAELens 6 form (`normalise_config`);
    SAELensFormatError if the folder is not a SAELens SAE."""
    path = Path(path)
    if not path.is_dir():
        raise SAELensFormatError(f"{path} is not a folder")
    if not is_folder(path):
        missing = [name for name in (CONFIG, WEIGHTS) if not (path / name).is_file()]
        raise SAELensFormatError(f"{path} is not a SAELens SAE folder: no {' and no '.join(missing)} "
                                 "(what SAELens's SAE.save_model writes)")
    try:
        raw = json.loads(read_text_file(path / CONFIG))
    except OSError as e:
        raise SAELensFormatError(f"{path / CONFIG} cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise SAELensFormatError(f"{path / CONFIG} is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not all(integer(1).ok(raw.get(key)) for key in ("d_in", "d_sae")):
        raise SAELensFormatError(f"{path / CONFIG} is not a SAELens SAE config: it needs integer d_in and d_sae >= 1")
    if not isinstance(raw.get("metadata", {}), (dict, type(None))):
        raise SAELensFormatError(f"{path / CONFIG}: metadata must be a JSON object, got {show(raw['metadata'])}")
    cfg = normalise_config(raw)
    for key, rule in FIELDS.items():
        node, *rest = key.split(".")
        value = cfg.get(node, ABSENT) if not rest else cfg["metadata"].get(rest[0], ABSENT)
        if value is not ABSENT and not rule.ok(value):
            raise SAELensFormatError(f"{path / CONFIG}: {key} must be {rule.allowed}, got {show(value)}")
    return cfg


def normalise_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A cfg.json dict in SAELens 6 form: configs without a SAELens >= 6 version get the renames and
    defaults SAELens 6 gives them (hook_point -> hook_name, architecture standard, apply_b_dec_to_input
    true, activation_fn topk -> architecture topk, boolean normalize_activations), and their
    model/hook fields move into `metadata`."""
    cfg = dict(raw)
    meta = dict(cfg.get("metadata") or {})
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    if not version or _major(str(version)) < 6:
        renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}
        cfg = {renames.get(k, k): v for k, v in cfg.items()}
        cfg.setdefault("architecture", "standard")
        cfg.setdefault("apply_b_dec_to_input", True)
        if cfg.get("activation_fn") == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
            cfg.update(architecture="topk", k=cfg["activation_fn_kwargs"]["k"])
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
        for key in ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos"):
            if key in cfg:
                meta.setdefault(key, cfg[key])
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("reshape_activations", "none")
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    cfg["metadata"] = meta
    return cfg


def _major(version: str) -> int:
    found = re.match(r"\s*v?(\d+)", version)
    return int(found.group(1)) if found else 0


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """sae_weights.safetensors as float32 tensors (SAELens names and orientation). A `scaling_factor` of
    all ones (older SAELens wrote one) is dropped, as SAELens drops it."""
    f = Path(path) / WEIGHTS
    try:
        tensors = load_file(f)
    except (SafetensorError, OSError) as e:
        raise SAELensFormatError(f"{f} is not a safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    tensors = {name: t.float() for name, t in tensors.items()}
    scale = tensors.get("scaling_factor")
    if scale is not None and torch.equal(scale, torch.ones_like(scale)):
        del tensors["scaling_factor"]
    return tensors


# ------------------------------------------------------------------------------------------ writing

def format_version() -> str:
    """The installed sae-lens version (the format written is that version's), else FORMAT_VERSION."""
    try:
        return package_metadata.version("sae-lens")
    except package_metadata.PackageNotFoundError:
        return FORMAT_VERSION


def write_folder(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """sae_weights.safetensors, then cfg.json, into the folder `path` (created), each written whole or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})
    write_atomic(path / WEIGHTS, lambda f: f.write(weights))
    write_json(path / CONFIG, config)
