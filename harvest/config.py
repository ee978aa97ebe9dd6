"""The harvest configuration: typed view of `conf/harvest/harvest.yaml` and the checks that need no model.

Defaults live in the YAML only; this module gives them types and refuses bad values early.
Checks that need the model's config (layer range, context length) live in `harvest.run.preflight`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runtime.config import (DEVICE, FLAG, NULL, Rule, as_whole, check_values, flatten, instantiate, integer, list_of,
                            one_of, text)
from runtime.errors import ToolkitError

SITES = ("resid_post", "attn_out", "mlp_in", "mlp_out")  # mlp_in: the MLP's input (what a transcoder reads)
CODECS = ("blosc_zstd", "zstd", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STORE_DTYPES = ("float16", "bfloat16")
PACKINGS = ("document", "concat")  # how documents become sequences: see harvest.text.Packer

# Keys that change how a harvest runs but not which rows it stores: a store may be resumed or
# extended with other values. Everything else in the config is the store's identity.
RUNTIME_KEYS = frozenset({"tokens", "store", "overwrite", "repair", "batch_size", "device", "progress",
                          "writer_threads"})


class HarvestError(ToolkitError):
    """Bad input or a refused operation; printed as one line, nothing is written."""


def slug(name: str) -> str:
    """A hub id or a path -> a short folder name: `data/models/smollm2-135m` -> `smollm2-135m`."""
    last = str(name).rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last)


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    config: str | None
    split: str
    text_field: str
    separator: str | None
    packing: str
    shuffle_buffer: int


def store_path(template: str, layer: int, site: str) -> str:
    """The store of one (layer, site): `{layer}` and `{site}` in the `store` template filled in."""
    return template.replace("{layer}", str(layer)).replace("{site}", site)


@dataclass(frozen=True)
class HarvestConfig:
    model: str
    layer: int | list[int]  # a list (or `site` a list): one store per (layer, site), from one forward pass
    site: str | list[str]
    context_size: int
    keep_pos0: bool
    tokens: int
    dataset: DatasetConfig
    store: str
    chunk_seqs: int
    store_dtype: str
    codec: str
    codec_level: int
    overwrite: bool
    repair: bool
    batch_size: int
    device: str
    dtype: str
    seed: int
    progress: bool
    writer_threads: int | str  # "auto": every core

    @property
    def rows_per_seq(self) -> int:
        """Rows stored per sequence: every position, less position 0 unless `keep_pos0`."""
        return self.context_size - (0 if self.keep_pos0 else 1)

    @property
    def chunk_rows(self) -> int:
        return self.chunk_seqs * self.rows_per_seq

    @property
    def n_chunks(self) -> int:
        """Chunks needed to hold the budget: `tokens` rounded up to whole chunks."""
        return -(-self.tokens // self.chunk_rows)

    @property
    def sites(self) -> list[tuple[int, str]]:
        """The (layer, site) pairs harvested: every layer with every site, in the order given."""
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        sites = self.site if isinstance(self.site, list) else [self.site]
        return [(layer, site) for layer in layers for site in sites]

    def for_site(self, layer: int, site: str) -> HarvestConfig:
        """The config of one (layer, site), its store path filled in: exactly what a harvest of that site
        alone is given, so its store is the same whether it is harvested alone or beside others."""
        return dataclasses.replace(self, layer=layer, site=site, store=store_path(self.store, layer, site))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The part of the config that determines the stored rows (see RUNTIME_KEYS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> HarvestConfig:
        """The typed config of a composed conf/harvest/harvest.yaml; every value checked (RULES), then
        the checks across keys (`validate`). HarvestError in one line for the first problem."""
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert isinstance(raw, dict)
        raw = {k: v for k, v in raw.items() if k != "hydra"}
        missing = [k for k, v in flatten(raw).items() if v == "???"]
        if missing:
            raise HarvestError(f"missing config value(s): {', '.join(missing)} (set them or pick a preset)")
        as_whole(raw, *WHOLE_KEYS)
        check_values(raw, rules(raw.get("codec")), HarvestError, DOCS)
        ds = instantiate(DatasetConfig, raw.pop("dataset"), HarvestError, "harvest")
        out = instantiate(cls, {**raw, "dataset": ds}, HarvestError, "harvest")
        out.validate()
        return out.for_site(*out.sites[0]) if len(out.sites) == 1 else out

    def validate(self) -> None:
        """The checks across keys that need nothing but the config (each value passed its rule)."""
        if self.repair and self.overwrite:
            raise HarvestError("repair=true and overwrite=true contradict each other: repair keeps the store and "
                               "harvests only its damaged chunks again, overwrite deletes it and harvests it all; "
                               "choose one")
        for key in ("layer", "site"):
            values = getattr(self, key)
            if isinstance(values, list) and len(set(values)) < len(values):
                twice = next(v for v in values if values.count(v) > 1)
                raise HarvestError(f"{key} lists {twice} more than once: each (layer, site) is one store")
        layers, sites = {layer for layer, _ in self.sites}, {site for _, site in self.sites}
        vary = [name for name, values in (("layer", layers), ("site", sites)) if len(values) > 1]
        if any("{" + name + "}" not in self.store for name in vary):
            raise HarvestError(f"store={self.store} names one store for {len(self.sites)} sites: put "
                               + " and ".join("{" + name + "}" for name in vary) + " in it, quoted for Hydra "
                               "(\"store='data/activations/gpt2_{site}{layer}'\"; the default has both)")
        if self.tokens < self.chunk_rows:
            raise HarvestError(f"tokens={self.tokens} is below one chunk ({self.chunk_rows} rows = chunk_seqs "
                               f"{self.chunk_seqs} x {self.rows_per_seq} positions); raise tokens or lower chunk_seqs")


DOCS = "conf/harvest/harvest.yaml"
WHOLE_KEYS = ("tokens",)  # counts that may be written like 5e6 on the command line
NAME = text("a hub id or a path")
# every key of conf/harvest/harvest.yaml (documented there) and what its value must be
RULES: dict[str, Rule] = {
    "model": NAME,
    "layer": (integer(0) | list_of(integer(0), "")).saying("an integer >= 0 or a list of them"),
    "site": (one_of(*SITES) | list_of(one_of(*SITES), "")).saying(f"one of {', '.join(SITES)}, or a list of them"),
    "context_size": integer(2),
    "keep_pos0": FLAG,
    "tokens": integer(1),
    "dataset.name": NAME,
    "dataset.config": text() | NULL,
    "dataset.split": text(),
    "dataset.text_field": text(),
    "dataset.separator": text() | NULL,
    "dataset.packing": one_of(*PACKINGS),
    "dataset.shuffle_buffer": integer(0),
    "store": text("a path"),
    "chunk_seqs": integer(1),
    "store_dtype": one_of(*STORE_DTYPES),
    "codec": one_of(*CODECS),
    "codec_level": integer(),
    "overwrite": FLAG,
    "repair": FLAG,
    "batch_size": integer(1),
    "device": DEVICE,
    "dtype": one_of(*DTYPES),
    "seed": integer(0),
    "progress": FLAG,
    "writer_threads": one_of("auto") | integer(1),
}
# the levels each codec takes: blosc's clevel 0..9; zstd's -131072 (fastest) ..22 (0 = its default, 3)
CODEC_LEVELS = {
    "blosc_zstd": integer(0, 9).saying("an integer in 0..9 with codec=blosc_zstd"),
    "zstd": integer(-131072, 22).saying("an integer in -131072..22 with codec=zstd"),
}


def rules(codec: object) -> dict[str, Rule]:
    """RULES, with the codec_level range of `codec` (none ignores the level)."""
    level = CODEC_LEVELS.get(codec) if isinstance(codec, str) else None
    return {**RULES, "codec_level": level or RULES["codec_level"]}
