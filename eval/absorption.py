"""`python -m eval.absorption run=<run dir> [overrides]`: first-letter feature absorption on real activations.

After SAEBench's first-letter absorption metric (Chanin et al. 2024, "A is for Absorption"; SAEBench
2025), written from what we remember of its definition: these machines cannot read the paper or the
code, so the thresholds and steps below are ours, stated here, and our numbers are not comparable to
SAEBench's. Everything is computed offline from the model's own vocabulary and the run's store:

1. Word tokens: the vocabulary entries that decode to a space and an ASCII word of >= 2 letters (" cat",
   not "cat" or " 42"); the label of a row is the first letter of its token, a..z. Rows come from the
   store: its activations at positions whose token is a word token.
2. Probe: a linear softmax classifier of the 26 first letters (L2-regularised, on standardised rows),
   fitted on up to `probe_tokens` word rows of the training chunks; its accuracy is measured on the
   held-out chunks. d_l: the unit direction of letter l's probe weights in activation space.
3. The SAE's letter latents, on the probe's training rows: for letter l the latent whose firing best
   predicts "first letter is l" (F1), then the next best ones added while the F1 of "any of them fires"
   grows by more than `f1_gain` (at most `max_main`): a letter feature split over several latents
   counts as one.
4. On the held-out word rows of letter l that the probe classifies correctly: a false negative when
   none of the letter latents fires; an absorption when, besides, a firing latent a carries the letter:
   cos(W_dec,a, d_l) >= `cos_min` and its share of the reconstruction's projection on d_l,
   z_a (W_dec,a . d_l) / sum_b z_b (W_dec,b . d_l) over the firing latents b, is >= `share_min`.
   absorption_l = absorptions / correct rows, fn_l = false negatives / correct rows.
5. The run's score: the mean over the letters with >= `min_tokens` correct held-out rows.

Writes <out>/absorption.json (per letter and the means); prints one line per run.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from eval.options import PATH, HeldOutOptions
from runtime.cli import launch
from runtime.config import NULL, Rule, integer, number
from runtime.errors import ToolkitError, one_line_errors, reraise_as

if TYPE_CHECKING:
    import torch

    from harvest.store import ActivationStore
    from train.run_dir import TrainedRun

LETTERS = string.ascii_lowercase
FILE = "absorption.json"


class AbsorptionError(ToolkitError):
    """Bad input; printed as one line before any work starts."""


@dataclass(frozen=True)
class AbsorptionConfig(HeldOutOptions):
    """conf/eval/absorption.yaml (every key documented there)."""

    out: str | None
    probe_tokens: int
    min_tokens: int
    f1_gain: float
    max_main: int
    cos_min: float
    share_min: float

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> AbsorptionConfig:
        return cls.compose(cfg, AbsorptionError, "absorption",
                           "run=<run dir> is required: a training run directory holding sae/", RULES,
                           whole=("probe_tokens",))


# the keys of conf/eval/absorption.yaml besides eval.options.HELD_OUT_RULES' (documented there)
RULES: dict[str, Rule] = {
    "out": PATH | NULL,
    "probe_tokens": integer(1),
    "min_tokens": integer(1),
    "f1_gain": number(0),
    "max_main": integer(1),
    "cos_min": number(-1, 1),
    "share_min": number(0, 1),
}


# ------------------------------------------------------------------------------------------ the math

def word_letters(tokenizer: Any) -> np.ndarray:
    """[V] int64: the first letter (0..25) of every vocabulary entry that decodes to a space and an ASCII
    word of at least 2 letters, -1 for every other entry."""
    out = np.full(len(tokenizer), -1, dtype=np.int64)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        word = text[1:]
        if text[:1] == " " and len(word) >= 2 and word.isascii() and word.isalpha():
            out[i] = LETTERS.index(word[0].lower())
    return out


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 200
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax classifier of y [n] in 0..25 from x [n, d], fitted by L-BFGS on standardised rows with an L2
    penalty: (W [26, d], c [26]) in activation space, logits = x W^T + c."""
    import torch

    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(len(LETTERS), x.shape[1], requires_grad=True)
    b = torch.zeros(len(LETTERS), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = (w / std).detach()
    return weights, (b - mean @ weights.T).detach()


def letter_latents(rows: np.ndarray, latents: np.ndarray, y: np.ndarray, n_latents: int, gain: float,
                   max_main: int) -> list[dict[str, Any]]:
    """The letter latents of every letter (module docstring, step 3) from the firings (rows [F], latents [F])
    on rows labelled y [n]: per letter {latents, f1}."""
    n_letter = np.bincount(y, minlength=len(LETTERS))
    fires = np.bincount(latents, minlength=n_latents)
    hits = np.bincount(latents * len(LETTERS) + y[rows], minlength=n_latents * len(LETTERS)).reshape(n_latents, -1)
    f1 = 2 * hits / np.maximum(fires[:, None] + n_letter[None], 1)  # [M, 26]
    fired_rows = {}
    out = []
    for letter in range(len(LETTERS)):
        order = np.argsort(-f1[:, letter])[: max(max_main * 3, 1)]
        chosen, best, covered = [], 0.0, np.zeros(len(y), dtype=bool)
        for a in order:
            if len(chosen) == max_main:
                break
            if a not in fired_rows:
                fired_rows[a] = rows[latents == a]
            union = covered.copy()
            union[fired_rows[a]] = True
            tp = int((union & (y == letter)).sum())
            score = 2 * tp / max(int(union.sum()) + int(n_letter[letter]), 1)
            if chosen and score <= best + gain:
                break
            chosen.append(int(a))
            best, covered = score, union
        out.append({"latents": chosen, "f1": best})
    return out


def score_rows(rows: np.ndarray, latents: np.ndarray, vals: np.ndarray, n_rows: int, main: list[int],
               dec_dot: np.ndarray, dec_cos: np.ndarray, cos_min: float, share_min: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """For n_rows held-out rows of one letter (firings rows [F] in 0..n_rows-1, latents [F], values [F]):
    (false negative [n_rows], absorbed [n_rows]) per the module docstring, step 4. dec_dot [M] = W_dec,a .
    d_l and dec_cos [M] = cos(W_dec,a, d_l)."""
    main_fires = np.zeros(n_rows, dtype=bool)
    main_fires[rows[np.isin(latents, main)]] = True
    proj = vals * dec_dot[latents]  # [F] each firing latent's part of the reconstruction's projection on d_l
    total = np.bincount(rows, weights=proj, minlength=n_rows)
    carrier = (dec_cos[latents] >= cos_min) & (proj > 0) & (proj >= share_min * total[rows])
    absorbed = np.zeros(n_rows, dtype=bool)
    absorbed[rows[carrier]] = True
    fn = ~main_fires
    return fn, fn & absorbed & (total > 0)


# ------------------------------------------------------------------------------------------ driver

def word_rows(store: ActivationStore, chunks: list[int], cut: float | None, letters: np.ndarray, max_rows: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows [n, d_in], first letters [n]) of the word-token rows of `chunks` (outliers left out),
    at most max_rows of them; a transcoder's store gives its input rows."""
    from harvest.held_out import outliers

    xs, ys, n = [], [], 0
    for i, raw in zip(chunks, store.read_chunks(list(chunks)), strict=False):
        label = letters[store.read_tokens(i)]
        keep = (label >= 0) & ~outliers(raw, cut)
        xs.append(store.as_float(raw)[keep][: max_rows - n, : store.d_in])  # a transcoder's input only
        ys.append(label[keep][: max_rows - n])
        n += len(ys[-1])
        if n >= max_rows:
            break
    if not xs:
        return np.zeros((0, store.d_in), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def measure(run: TrainedRun, tokenizer: Any, cfg: AbsorptionConfig, device: torch.device) -> dict[str, Any]:
    """Everything in absorption.json for one opened run."""
    import torch

    from eval.firings import encode_rows
    from harvest.held_out import split_chunks

    letters = word_letters(tokenizer)
    train_chunks, _ = split_chunks(run.store.n_chunks, run.config.eval_frac)
    x_tr, y_tr = word_rows(run.store, train_chunks, run.held.cut, letters, cfg.probe_tokens)
    x_ho, y_ho = word_rows(run.store, run.held.chunks, run.held.cut, letters, cfg.max_tokens)
    if len(x_tr) < len(LETTERS) or len(x_ho) == 0:
        raise AbsorptionError(f"store {run.store.path} has {len(x_tr)} training and {len(x_ho)} held-out word-token "
                              "rows: too few to fit and test a first-letter probe")
    weights, bias = fit_probe(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    predicted = (torch.from_numpy(x_ho) @ weights.T + bias).argmax(1).numpy()
    accuracy = float((predicted == y_ho).mean())

    m = run.sae.layout().n_latents
    r_tr, l_tr, _ = encode_rows(run.sae, x_tr, cfg.batch_size, device, cfg.progress)
    mains = letter_latents(r_tr, l_tr, y_tr, m, cfg.f1_gain, cfg.max_main)
    r_ho, l_ho, v_ho = encode_rows(run.sae, x_ho, cfg.batch_size, device, cfg.progress)
    dec = run.sae.decoder_directions().detach().float().cpu()
    unit = torch.nn.functional.normalize(weights, dim=1)  # [26, d]
    dots = (dec @ unit.T).numpy()  # [M, 26]
    cos = (torch.nn.functional.normalize(dec, dim=1) @ unit.T).numpy()
    per_letter, scored = {}, []
    for letter, name in enumerate(LETTERS):
        correct = np.flatnonzero((y_ho == letter) & (predicted == letter))
        local = np.full(len(y_ho), -1)
        local[correct] = np.arange(len(correct))
        keep = local[r_ho] >= 0
        fn, absorbed = score_rows(local[r_ho[keep]], l_ho[keep], v_ho[keep], len(correct), mains[letter]["latents"],
                                  dots[:, letter], cos[:, letter], cfg.cos_min, cfg.share_min)
        entry = {"held_out_rows": int((y_ho == letter).sum()), "correct_rows": len(correct),
                 "main_latents": mains[letter]["latents"], "main_f1": mains[letter]["f1"],
                 "fn_rate": float(fn.mean()) if len(correct) else None,
                 "absorption": float(absorbed.mean()) if len(correct) else None}
        per_letter[name] = entry
        if len(correct) >= cfg.min_tokens:
            scored.append(entry)
    mean_of = (lambda key: float(np.mean([e[key] for e in scored])) if scored else None)  # noqa: E731
    return {"run": str(run.dir.path), "arch": run.sae.arch, "store": str(run.store.path),
            "probe_rows": len(x_tr), "held_out_rows": len(x_ho), "probe_accuracy": accuracy,
            "letters_scored": len(scored), "absorption": mean_of("absorption"), "fn_rate": mean_of("fn_rate"),
            "main_f1": mean_of("main_f1"), "letters": per_letter,
            "settings": {"min_tokens": cfg.min_tokens, "f1_gain": cfg.f1_gain, "max_main": cfg.max_main,
                         "cos_min": cfg.cos_min, "share_min": cfg.share_min},
            "notes": ["after SAEBench's first-letter absorption, from our recollection of its definition (module "
                      "docstring of eval/absorption.py); not comparable to SAEBench's numbers"]}


def absorption(cfg: AbsorptionConfig) -> dict[str, Any]:
    """Measure one run (every input checked first); writes and returns absorption.json."""
    from eval.firings import open_run

    with reraise_as(AbsorptionError):
        run, tokenizer, device = open_run(cfg.run, cfg.store, cfg.outlier_factor, cfg.device)
    result = measure(run, tokenizer, cfg, device)
    out = Path(cfg.out) if cfg.out else run.dir.path
    run.dir.writer_lock(f"run {run.dir}", AbsorptionError).check()  # not while a launch replaces its weights
    out.mkdir(parents=True, exist_ok=True)
    (out / FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(config_path="../conf/eval", config_name="absorption", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `absorption: error: ...` and exit 2 on bad input."""
    with one_line_errors("absorption"):
        r = absorption(AbsorptionConfig.from_omegaconf(cfg))
    print(f"absorption: {r['run']} ({r['arch']}): probe accuracy {r['probe_accuracy']:.3f}, "
          f"{r['letters_scored']} letters scored, absorption {r['absorption']}, false negatives {r['fn_rate']}")


if __name__ == "__main__":
    launch("absorption", main, AbsorptionConfig.from_omegaconf, conf="eval")
