"""Which held-out tokens fire which latent, with what value: what the feature dashboards
(eval/dashboard.py) and detection scoring (eval/autointerp.py) read from a trained run.

`scan` encodes the run's held-out rows once and keeps every non-zero code as a (store row, latent,
activation) triple, or only those of chosen latents, while counting every latent's firings. From a
feature's firings: `choose` picks the features to study, `top` its strongest firings, `deciles` a
sample from each of its ten activation deciles; `window` maps a row to the tokens around it in its
own sequence and `values_at` reads a feature's activations there.

Shapes: F kept triples, n evaluated rows, M latents, n_f firings of one feature, w tokens of a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the first scan
    import torch

    from harvest.store import ActivationStore
    from train.run_dir import TrainedRun
    from train.saes import SAE

N_DECILES = 10


def open_run(run: str, store: str | None, outlier_factor: float | str | None, device: str
             ) -> tuple[TrainedRun, object, torch.device]:
    """A finished run opened for feature analysis: (the run with its SAE and store, the store's
    tokenizer, the device). Every check happens here, before any encoding; problems are ToolkitErrors."""
    from harvest.lm import load_tokenizer
    from runtime.device import pick_device
    from train.run_dir import RunDir

    RunDir(run).check_trained()
    torch_device = pick_device(device)
    trained = RunDir(run).open(torch_device, store, outlier_factor)
    return trained, load_tokenizer(trained.store.tokenizer_name), torch_device


def encode_rows(sae: SAE, x: np.ndarray, batch_size: int, device: torch.device, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-zero code of the SAE's input rows x [n, d] (a transcoder's input half), encoded batch_size
    rows at a time: (row [F] in 0..n-1, latent [F], value [F]) as numpy."""
    import torch
    from tqdm import tqdm

    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(x), batch_size), desc="encode", unit="batch", disable=not progress):
            r, lat, v = sae.encode(torch.from_numpy(x[start:start + batch_size]).to(device)).nonzero()
            parts.append((r.cpu().numpy() + start, lat.cpu().numpy(), v.float().cpu().numpy()))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows, latents, values = (np.concatenate(p) for p in zip(*parts, strict=True))
    return rows, latents, values


@dataclass
class Firings:
    """The firings kept by `scan`, sorted by (latent, row).

    rows [F] int64 store rows, latents [F] int64, acts [F] float32 (all > 0); seen [n] int64 the
    evaluated rows, ascending; counts [M] int64 the firings of every latent over the seen rows (of all
    latents, also when only some latents' triples were kept).
    """

    rows: np.ndarray
    latents: np.ndarray
    acts: np.ndarray
    seen: np.ndarray
    counts: np.ndarray

    def of(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n_f] ascending, acts [n_f]) of latent f."""
        lo, hi = np.searchsorted(self.latents, [f, f + 1])
        return self.rows[lo:hi], self.acts[lo:hi]


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def scan(run: TrainedRun, device: torch.device, *, max_tokens: int, batch_size: int, whole_chunks: bool,
         only: list[int] | None = None, progress: bool = False) -> Firings:
    """Encode the run's held-out rows in order (`run.held.rows_with_ids`: outliers left out), and keep the
    firings of the latents `only` (None: every latent; []: none, counting only).

    whole_chunks=False reads exactly the first max_tokens kept rows (eval's token count);
    whole_chunks=True reads whole chunks until at least max_tokens rows (outliers included) were read,
    so that every row of a window around a seen row was seen too (outliers aside).
    Memory: about 20 bytes per kept triple, rows x L0 of them when every latent is kept.
    """
    import torch
    from tqdm import tqdm

    C, M = run.store.chunk_rows, run.sae.n_latents
    keep = None if only is None else torch.tensor(sorted(set(only)), dtype=torch.long, device=device)
    counts = torch.zeros(M, dtype=torch.long, device=device)
    rows_l, latents_l, acts_l, seen_l = [], [], [], []
    n = 0
    bar = tqdm(total=min(max_tokens, len(run.held.chunks) * C), unit="tok", desc="encode", disable=not progress)
    for ids, x in run.held.rows_with_ids(max_tokens, whole_chunks):
        for s in range(0, len(x), batch_size):
            xb = run.sae.split(torch.from_numpy(x[s : s + batch_size]).to(device))[0]  # a transcoder's input
            with torch.inference_mode():
                r, j, v = run.sae.encode(xb).nonzero()
                counts += torch.bincount(j, minlength=M)
                if keep is not None:
                    hit = torch.isin(j, keep)
                    r, j, v = r[hit], j[hit], v[hit]
            rows_l.append(ids[s:][r.cpu().numpy()])
            latents_l.append(j.cpu().numpy())
            acts_l.append(v.float().cpu().numpy())
            bar.update(len(xb))
        seen_l.append(ids)
        n += len(ids)
    bar.total = n  # outlier rows left out
    bar.refresh()
    bar.close()
    rows, latents, acts = _cat(rows_l, np.int64), _cat(latents_l, np.int64), _cat(acts_l, np.float32)
    order = np.lexsort((rows, latents))
    return Firings(rows[order], latents[order], acts[order], _cat(seen_l, np.int64), counts.cpu().numpy())


def choose(counts: np.ndarray | None, features: str | list[int], n: int, seed: int, min_count: int = 1
           ) -> list[int]:
    """The features to study, ascending: a list of latent ids as given (each once; counts unused), or n
    of the latents firing at least min_count times (counts [M]): "random" draws them with `seed`,
    "top_density" takes the most frequent (ties: lower id first)."""
    if isinstance(features, list):
        return sorted(set(features))
    if counts is None:
        raise ValueError(f"features={features} chooses by firing counts: pass the counts")
    alive = np.flatnonzero(counts >= min_count)
    if features == "top_density":
        return sorted(alive[np.argsort(-counts[alive], kind="stable")][:n].tolist())
    if features == "random":
        return sorted(np.random.default_rng(seed).choice(alive, size=min(n, len(alive)), replace=False).tolist())
    raise ValueError(f"features must be a list, random or top_density, got {features!r}")


def top(store: ActivationStore, rows: np.ndarray, acts: np.ndarray, n: int, one_per_sequence: bool = False
        ) -> np.ndarray:
    """Indices [<= n] into a feature's firings (rows [n_f], acts [n_f]), strongest first (ties in row
    order); one_per_sequence: only the strongest firing of each sequence."""
    order = np.argsort(-acts, kind="stable")
    if not one_per_sequence:
        return order[:n]
    picked, seqs = [], set()
    for i in order:
        if len(picked) == n:
            break
        if (seq := store.locate(rows[i])[0]) not in seqs:
            picked.append(i)
            seqs.add(seq)
    return np.array(picked, dtype=np.int64)


def deciles(acts: np.ndarray, n: int, rng: np.random.Generator, among: np.ndarray | None = None
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ten (decile [m_d], sample [min(n, m_d)]) pairs of index arrays into acts [n_f], decile 1
    (weakest) first: the firings `among` (None: all) ranked by activation (ties in row order), rank i of
    m in decile d + 1 when m d // 10 <= i < m (d + 1) // 10 (so the strongest is always in decile 10),
    and n of each drawn without replacement, decile 1's first."""
    among = np.arange(len(acts)) if among is None else among
    ranked = among[np.argsort(acts[among], kind="stable")]
    m, out = len(ranked), []
    for d in range(N_DECILES):
        part = ranked[m * d // N_DECILES : m * (d + 1) // N_DECILES]
        out.append((part, rng.choice(part, size=min(n, len(part)), replace=False) if len(part) else part))
    return out


def sequence_rows(store: ActivationStore, seq: int) -> np.ndarray:
    """[rows_per_seq] int64: the store rows of sequence seq."""
    return np.array([store.row_at(seq, p) for p in range(store.first_pos, store.context_size)], dtype=np.int64)


def window(store: ActivationStore, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The tokens around `row` within its own sequence: (token ids [w], store row of each [w], -1 for a
    position without a row (before first_pos), index of `row`'s token), w <= before + 1 + after."""
    seq, pos = store.locate(row)
    ids = store.sequence(seq)
    lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
    rows = [store.row_at(seq, p) if p >= store.first_pos else -1 for p in range(lo, hi)]
    return ids[lo:hi], np.array(rows, dtype=np.int64), pos - lo


def values_at(rows: np.ndarray, f_rows: np.ndarray, f_acts: np.ndarray) -> np.ndarray:
    """float64 [w]: a feature's activation at each of rows [w] (0 where it does not fire, and at -1),
    from its firings f_rows [n_f] ascending, f_acts [n_f]."""
    out = np.zeros(len(rows))
    if len(f_rows):
        at = np.minimum(np.searchsorted(f_rows, rows), len(f_rows) - 1)
        hit = (rows >= 0) & (f_rows[at] == rows)
        out[hit] = f_acts[at[hit]]
    return out
