"""`python -m harvest.synth [overrides]` (= `make synth`): a store of synthetic activations with a known truth.

The generative model (conf/synth/synth.yaml names every knob). A dictionary D [F, d] of unit
directions, drawn around `clusters` random centres c_k (D_f = unit(c_k(f) + s g_f / sqrt(d)), g_f
standard normal, s = cluster_spread; with clusters=0, D_f = unit(g_f)). Row t is

    x_t = sum_f z_tf a_tf D_f + noise e_t / sqrt(d),        e_t standard normal [d]

with z_tf in {0, 1} whether feature f fires and a_tf = m_f exp(sigma n_tf) its magnitude (m_f drawn
in [0.5, 1.5] once, sigma = magnitude_spread, n_tf standard normal). Which features fire:
  - free features fire independently, f with probability p_f proportional to (rank_f + 1)^-zipf, the
    ranks a random order, scaled so that the p_f sum to l0 (each at most 1);
  - hierarchies: the `parents` most frequent free features each have `children` children (features
    taken from the rest), and a child fires only when its parent fires, then with chance child_rate:
    the structure behind feature absorption (a latent for the child can swallow the parent's direction);
  - correlated groups: `groups` disjoint sets of `group_size` free features (not parents) all fire
    together with chance group_rate per row, besides their own rates.
Every chunk is a function of (seed, chunk index) alone: chunks can be made in any order and again.

The truth lies in the store, beside its arrays, in files this module owns:
    truth/dictionary.npy   D [F, d] float32
    truth/truth.json       {features, d, rates p_f, magnitudes m_f, cluster_of, parents {parent: [children]},
                            groups [[...]], config}
their CRC-32s recorded in the store's attributes (`synthetic`), checked by `read_truth`. The store is
an ordinary store (rows float16, the `tokens` and `contexts` arrays zeros): every architecture trains
on it unchanged; its `model` is "synthetic", so eval skips CE loss recovered (there is no LM).
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from harvest import store
from harvest.config import HarvestError
from runtime.cli import launch
from runtime.config import FLAG, integer, number, text, typed_config
from runtime.errors import one_line_errors
from runtime.location import Location

MODEL = "synthetic"  # the `model` attribute of a synthetic store
ROWS_PER_SEQ = 128  # rows are grouped in "sequences" of this many (the store's layout wants some)
DICTIONARY, TRUTH = "truth/dictionary.npy", "truth/truth.json"
RULES = {
    "store": text("a path or an URL"), "tokens": integer(1), "chunk_rows": integer(ROWS_PER_SEQ),
    "d": integer(2), "features": integer(2), "l0": number(0, lo_open=True), "zipf": number(0),
    "magnitude_spread": number(0), "clusters": integer(0), "cluster_spread": number(0, lo_open=True),
    "parents": integer(0), "children": integer(0), "child_rate": number(0, 1), "groups": integer(0),
    "group_size": integer(2), "group_rate": number(0, 1), "noise": number(0), "seed": integer(0),
    "overwrite": FLAG, "progress": FLAG,
}


@dataclass(frozen=True)
class SynthConfig:
    store: str
    tokens: int
    chunk_rows: int
    d: int
    features: int
    l0: float
    zipf: float
    magnitude_spread: float
    clusters: int
    cluster_spread: float
    parents: int
    children: int
    child_rate: float
    groups: int
    group_size: int
    group_rate: float
    noise: float
    seed: int
    overwrite: bool
    progress: bool

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> SynthConfig:
        out = typed_config(cls, cfg, HarvestError, "synth", "conf/synth/synth.yaml", RULES,
                           whole=("tokens", "chunk_rows"))
        out.validate()
        return out

    def validate(self) -> None:
        if self.chunk_rows % ROWS_PER_SEQ:
            raise HarvestError(f"chunk_rows must be a multiple of {ROWS_PER_SEQ}, got {self.chunk_rows}")
        structured = self.parents * (1 + self.children) + self.groups * self.group_size
        if structured > self.features:
            raise HarvestError(f"parents x (1 + children) + groups x group_size = {structured} features, more than "
                               f"features={self.features}")
        if self.l0 > self.features - self.parents * self.children:
            raise HarvestError(f"l0={self.l0} is more than the {self.features - self.parents * self.children} "
                               "features that fire on their own")

    @property
    def n_chunks(self) -> int:
        return -(-self.tokens // self.chunk_rows)

    @property
    def layout(self) -> store.Layout:
        return store.Layout(d_model=self.d, context_size=ROWS_PER_SEQ, first_pos=0,
                            chunk_seqs=self.chunk_rows // ROWS_PER_SEQ, n_chunks=self.n_chunks, acts_dtype="float16")

    def identity(self) -> dict[str, Any]:
        """What determines the rows: everything but where they go and how the run looks."""
        return {k: v for k, v in asdict(self).items() if k not in ("store", "tokens", "overwrite", "progress")}


@dataclass(frozen=True)
class Truth:
    """The ground truth of a synthetic store."""

    dictionary: np.ndarray  # [F, d] float32, unit rows
    rates: np.ndarray  # [F] firing probability of each feature on its own (children: 0)
    magnitudes: np.ndarray  # [F] mean magnitude m_f
    cluster_of: np.ndarray  # [F] int, -1 without clusters
    parents: dict[int, list[int]]  # parent -> its children
    groups: list[list[int]]

    @classmethod
    def draw(cls, cfg: SynthConfig) -> Truth:
        """The truth of a config (a function of its seed)."""
        rng = np.random.default_rng([cfg.seed, 0])
        F, d = cfg.features, cfg.d
        if cfg.clusters:
            centres = _unit(rng.standard_normal((cfg.clusters, d)))
            cluster_of = rng.integers(0, cfg.clusters, F)
            dictionary = _unit(centres[cluster_of] + cfg.cluster_spread * rng.standard_normal((F, d)) / np.sqrt(d))
        else:
            cluster_of = np.full(F, -1)
            dictionary = _unit(rng.standard_normal((F, d)))
        order = rng.permutation(F)
        n_children = cfg.parents * cfg.children
        child_ids, free = order[:n_children], order[n_children:]
        weights = (np.arange(len(free)) + 1.0) ** -cfg.zipf  # free[0] is the most frequent
        rates = np.zeros(F)
        rates[free] = np.minimum(1.0, cfg.l0 * weights / weights.sum())
        parents = {int(free[i]): [int(c) for c in child_ids[i * cfg.children : (i + 1) * cfg.children]]
                   for i in range(cfg.parents)}
        rest = free[cfg.parents :]
        groups = [[int(f) for f in rest[g * cfg.group_size : (g + 1) * cfg.group_size]] for g in range(cfg.groups)]
        magnitudes = rng.uniform(0.5, 1.5, F)
        return cls(dictionary.astype(np.float32), rates, magnitudes, cluster_of, parents, groups)

    def codes(self, cfg: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, F] float32: a_tf z_tf, the magnitude of every firing feature in n rows (model above)."""
        fires = rng.random((n, len(self.rates))) < self.rates
        for group in self.groups:
            fires[:, group] |= (rng.random(n) < cfg.group_rate)[:, None]
        for parent, kids in self.parents.items():
            fires[:, kids] = fires[:, [parent]] & (rng.random((n, len(kids))) < cfg.child_rate)
        size = self.magnitudes * np.exp(cfg.magnitude_spread * rng.standard_normal((n, len(self.rates))))
        return np.where(fires, size, 0.0).astype(np.float32)

    def rows(self, cfg: SynthConfig, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk i: (codes [chunk_rows, F], rows [chunk_rows, d] float32), a function of (seed, i)."""
        rng = np.random.default_rng([cfg.seed, 1, i])
        codes = self.codes(cfg, rng, cfg.chunk_rows)
        x = codes @ self.dictionary + cfg.noise * rng.standard_normal((cfg.chunk_rows, cfg.d)) / np.sqrt(cfg.d)
        return codes, x.astype(np.float32)

    def files(self, cfg: SynthConfig) -> dict[str, bytes]:
        """The truth's files, {key in the store: bytes}."""
        buf = io.BytesIO()
        np.save(buf, self.dictionary)
        meta = {"features": len(self.rates), "d": int(self.dictionary.shape[1]), "rates": self.rates.tolist(),
                "magnitudes": self.magnitudes.tolist(), "cluster_of": self.cluster_of.tolist(),
                "parents": {str(p): kids for p, kids in self.parents.items()}, "groups": self.groups,
                "config": cfg.identity()}
        return {DICTIONARY: buf.getvalue(), TRUTH: json.dumps(meta).encode()}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def is_synthetic(s: store.ActivationStore) -> bool:
    """Whether the store was written here (it records a truth), whatever its `model` attribute says."""
    return "synthetic" in s.attrs


def read_truth(s: store.ActivationStore) -> Truth:
    """The truth a synthetic store records, each file checked against its CRC-32 (DamagedStore naming
    it otherwise)."""
    if not is_synthetic(s):
        raise HarvestError(f"store {s.path} is not synthetic: it has no ground truth (make synth writes one)")
    want = s.attrs.get("synthetic", {}).get("crc32", {})
    data = {}
    for key in (DICTIONARY, TRUTH):
        try:
            data[key] = s.location.read(key)
        except FileNotFoundError:
            raise store.DamagedStore(f"store {s.path} is damaged: its truth {key} is missing") from None
        if zlib.crc32(data[key]) != want.get(key):
            raise store.DamagedStore(f"store {s.path} is damaged: its truth {key} does not match its recorded CRC-32")
    meta = json.loads(data[TRUTH])
    return Truth(np.load(io.BytesIO(data[DICTIONARY])), np.asarray(meta["rates"]), np.asarray(meta["magnitudes"]),
                 np.asarray(meta["cluster_of"]), {int(p): kids for p, kids in meta["parents"].items()}, meta["groups"])


def true_codes(s: store.ActivationStore, truth: Truth, chunk: int) -> np.ndarray:
    """The true codes [chunk_rows, F] of chunk `chunk` of a synthetic store (which features fired in each
    row, with what magnitude), made again from the config the store records: a function of (seed, chunk)."""
    recorded = s.attrs["synthetic"]["config"]
    cfg = SynthConfig(store=str(s.path), tokens=s.n_rows, overwrite=False, progress=False, **recorded)
    return truth.codes(cfg, np.random.default_rng([cfg.seed, 1, chunk]), cfg.chunk_rows)


def synthesize(cfg: SynthConfig) -> store.ActivationStore:
    """Write the synthetic store of `cfg` (its truth first, then its chunks); a complete one of the
    same config is kept as it is. Refused in one line: a store of another config, or anything that
    is not a store, at `store` (unless overwrite=true)."""
    loc = Location.of(cfg.store)
    loc.check_writable()
    if loc.exists():
        if store.is_store(loc) and not cfg.overwrite:
            found = store.ActivationStore(loc)
            same = found.attrs.get("synthetic", {}).get("config") == cfg.identity()
            if same and found.complete and found.n_chunks == cfg.n_chunks:
                print(f"store {cfg.store} is complete ({found.n_rows:,} rows); nothing to do")
                return found
            raise HarvestError(f"store {cfg.store} holds other rows than this config makes; pass overwrite=true "
                               "to replace it, or choose another store=")
        if not cfg.overwrite and not (loc.is_dir() and not loc.listdir()):
            raise HarvestError(f"store path {cfg.store} exists and is not a synthetic store of this config; "
                               "pass overwrite=true to replace it, or choose another store=")
        if store.looks_like_store(loc):
            store.remove(loc)
    truth = Truth.draw(cfg)
    files = truth.files(cfg)
    meta = {"model": MODEL, "layer": 0, "site": MODEL, "tokenizer": None, "n_layers": 0, "config": {"synth": True},
            "synthetic": {"config": cfg.identity(), "crc32": {k: zlib.crc32(v) for k, v in files.items()}}}
    L = cfg.layout
    writer = store.StoreWriter.create(loc, L, store.codec("blosc_zstd", 3), meta)
    for key, data in files.items():
        loc.write(key, data)
    zeros = np.zeros((L.chunk_seqs, L.context_size), dtype=np.int32)
    for i in tqdm(range(L.n_chunks), desc=f"synth {loc.name}", unit="chunk", disable=not cfg.progress):
        _, x = truth.rows(cfg, i)
        rows = x.astype(np.float16)
        if not np.isfinite(rows).all():
            raise HarvestError("synthetic rows overflow float16: lower the magnitudes or the noise")
        writer.write_chunk(i, rows, zeros, {"docs_consumed": 0, "carry": []})
    store.finish(loc, L, meta)
    return store.ActivationStore(loc)


@hydra.main(config_path="../conf/synth", config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors("synth"):
        s = synthesize(SynthConfig.from_omegaconf(cfg))
    print(f"store: {s.path} ({s.n_rows:,} rows of d={s.d_model}, {s.attrs['synthetic']['config']['features']} "
          "true features)")


if __name__ == "__main__":
    launch("synth", main, SynthConfig.from_omegaconf)
