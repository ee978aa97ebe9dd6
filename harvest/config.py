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

from runtime.config import flatten, instantiate
from runtime.errors import ToolkitError

SITES = ("resid_post", "attn_out", "mlp_out")
CODECS = ("blosc_zstd", "zstd", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STORE_DTYPES = ("float16", "bfloat16")
PACKINGS = ("document", "concat")  # how documents become sequences: see harvest.text.Packer

# Keys that change how a harvest runs but not which rows it stores: a store may be resumed or
# extended with other values. Everything else in the config is the store's identity.
RUNTIME_KEYS = frozenset({"tokens", "store", "overwrite", "batch_size", "device", "progress"})


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


@dataclass(frozen=True)
class HarvestConfig:
    model: str
    layer: int
    site: str
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
    batch_size: int
    device: str
    dtype: str
    seed: int
    progress: bool

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The part of the config that determines the stored rows (see RUNTIME_KEYS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> HarvestConfig:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert isinstance(raw, dict)
        raw = {k: v for k, v in raw.items() if k != "hydra"}
        missing = [k for k, v in flatten(raw).items() if v == "???"]
        if missing:
            raise HarvestError(f"missing config value(s): {', '.join(missing)} (set them or pick a preset)")
        if isinstance(raw.get("tokens"), float) and raw["tokens"].is_integer():
            raw["tokens"] = int(raw["tokens"])  # tokens=5e6 on the command line
        ds = instantiate(DatasetConfig, raw.pop("dataset"), HarvestError, "harvest")
        out = instantiate(cls, {**raw, "dataset": ds}, HarvestError, "harvest")
        out.validate()
        return out

    def validate(self) -> None:
        """Checks that need nothing but the config itself."""
        _check(self.site in SITES, f"unknown site {self.site!r}; choose one of {', '.join(SITES)}")
        _check(isinstance(self.layer, int) and self.layer >= 0, f"layer must be a block index >= 0, got {self.layer!r}")
        _check(isinstance(self.context_size, int) and self.context_size >= 2, f"context_size must be >= 2, got {self.context_size!r}")
        _check(isinstance(self.chunk_seqs, int) and self.chunk_seqs >= 1, f"chunk_seqs must be >= 1, got {self.chunk_seqs!r}")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        _check(self.store_dtype in STORE_DTYPES, f"unknown store_dtype {self.store_dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        _check(self.codec in CODECS, f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        _check(isinstance(self.tokens, int), f"tokens must be a whole number, got {self.tokens!r}")
        _check(self.tokens >= self.chunk_rows,
               f"tokens={self.tokens} is below one chunk ({self.chunk_rows} rows = chunk_seqs {self.chunk_seqs} "
               f"x {self.rows_per_seq} positions); raise tokens or lower chunk_seqs")
        _check(self.dataset.packing in PACKINGS,
               f"unknown dataset.packing {self.dataset.packing!r}; choose one of {', '.join(PACKINGS)}")
        _check(isinstance(self.dataset.shuffle_buffer, int) and self.dataset.shuffle_buffer >= 0,
               "dataset.shuffle_buffer must be an integer >= 0")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise HarvestError(message)
