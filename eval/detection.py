"""Detection scoring (Juang et al. 2024), the LLM side of `eval.autointerp`: plain-text samples of
features in, explanations and per-decile detection scores out. Needs no SAE: `explain_and_score`
takes `FeatureSample`s and two `ChatClient`s (eval/llm.py).

    explainer prompt  top contexts with active tokens marked <<like this>> and 0-10 strengths
    scorer prompt     the explanation + ~5 shuffled unmarked contexts -> a JSON list of 0/1
    scores            recall per activation decile, accuracy on non-activating contexts, balanced
                      accuracy; Wilson intervals per feature, percentile bootstrap over features
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from eval.firings import N_DECILES  # the activation deciles contexts are drawn from
from eval.llm import ChatClient, LLMError, map_concurrent


@dataclass
class Context:
    """One token window of the store: `text` unmarked (what the scorer sees), `marked` with the
    feature's active tokens in <<...>>, `tokens` the active pieces and their activations."""

    row: int
    decile: int  # 1..10 (10 = strongest), 0 = non-activating, -1 = an explanation example
    activation: float
    text: str
    marked: str
    tokens: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class FeatureSample:
    feature: int
    n_active: int  # activating rows among the scanned ones
    max_activation: float
    explain: list[Context]  # top examples, shown marked to the explainer
    contexts: list[Context]  # decile and non-activating contexts, shown unmarked to the scorer


# ---------------------------------------------------------------- prompts and parsing (LLM side)

EXPLAINER_SYSTEM = (
    "You are interpreting one feature of a language model's internal activations. You will see short "
    "excerpts of text. In each excerpt, the tokens on which the feature is active are marked <<like this>>, "
    "and the line below the excerpt lists those tokens with the activation strength on a 0-10 scale. "
    "Work out what the marked tokens, and the text around them, have in common. Then describe the feature in "
    "ONE short sentence that would let a reader predict on which text it is active. Reply with exactly one "
    "line of the form:\nExplanation: <one sentence>")

SCORER_SYSTEM = (
    "You are checking an explanation of one feature of a language model. The feature is active on some "
    "tokens of some texts. You will get the explanation and {n} numbered text excerpts. For each excerpt, "
    "decide whether the feature, as explained, is active on at least one of its tokens. Reply with only a "
    "JSON list of {n} numbers, in the order of the excerpts: 1 if the feature is active in that excerpt, "
    "0 if it is not. For example: {example}. Write nothing else.")


def explainer_messages(sample: FeatureSample) -> list[dict[str, str]]:
    top = max(sample.max_activation, 1e-12)
    parts = []
    for i, c in enumerate(sample.explain, start=1):
        strengths = ", ".join(f"{json.dumps(p, ensure_ascii=False)} {round(10 * v / top)}" for p, v in c.tokens)
        parts.append(f"Excerpt {i}: {c.marked}\nActive tokens: {strengths}")
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)}]


def scorer_messages(explanation: str, texts: list[str]) -> list[dict[str, str]]:
    n = len(texts)
    example = json.dumps([(i + 1) % 2 for i in range(n)])
    body = "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, start=1))
    return [{"role": "system", "content": SCORER_SYSTEM.format(n=n, example=example)},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"}]


def _strip_reasoning(text: str) -> str:
    return re.sub(r"(?s)<think>.*?(</think>|$)", "", text)


def parse_explanation(text: str) -> str | None:
    """The sentence after the last "Explanation:" (or the first non-empty line); None if empty."""
    text = _strip_reasoning(text)
    if found := list(re.finditer(r"(?i)explanation\s*:", text)):
        text = text[found[-1].end():]
    lines = [line.strip().strip("*\"'` ").strip() for line in text.strip().splitlines()]
    return next((line for line in lines if line), None)


_YES = {"1": 1, "yes": 1, "true": 1, "0": 0, "no": 0, "false": 0}
_LINE = re.compile(r"(?im)^[\s*#-]*(?:excerpt|context)?\s*#?(\d+)\s*[:.)=-]\s*\**\s*(yes|no|true|false|1|0)\b")


def _flag(v: Any) -> int | None:
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
        return int(v)
    return _YES.get(v.strip().lower()) if isinstance(v, str) else None


def parse_judgments(text: str, n: int) -> list[int] | None:
    """n 0/1 verdicts from a JSON list (the last one of length n), else from "1: yes" lines; None if neither."""
    text = _strip_reasoning(text)
    for m in reversed(list(re.finditer(r"\[[^\[\]]*\]", text))):
        try:
            items = json.loads(m.group(0))
        except ValueError:
            continue
        flags = [_flag(v) for v in items]
        if len(flags) == n and None not in flags:
            return flags  # type: ignore[return-value]
    lines = {int(m.group(1)): _YES[m.group(2).lower()] for m in _LINE.finditer(text)}
    return [lines[i] for i in range(1, n + 1)] if set(lines) == set(range(1, n + 1)) else None


# ---------------------------------------------------------------- scoring


def wilson(k: int, n: int, ci: float) -> list[float] | None:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + ci / 2)
    p, denom = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def feature_scores(contexts: list[dict[str, Any]], ci: float) -> dict[str, Any]:
    """Recall per decile, non-activating accuracy, balanced accuracy of one feature's judged contexts."""
    fires, judged = [0] * N_DECILES, [0] * N_DECILES
    neg_ok = neg_n = 0
    for c in contexts:
        if c["judged"] is None:
            continue
        if c["decile"] == 0:
            neg_ok, neg_n = neg_ok + (1 - c["judged"]), neg_n + 1
        else:
            fires[c["decile"] - 1] += c["judged"]
            judged[c["decile"] - 1] += 1
    recall_all = sum(fires) / sum(judged) if sum(judged) else None
    neg = neg_ok / neg_n if neg_n else None
    return {
        "recall": [f / n if n else None for f, n in zip(fires, judged, strict=True)],
        "recall_ci": [wilson(f, n, ci) for f, n in zip(fires, judged, strict=True)],
        "fires": fires, "judged": judged,
        "recall_all": recall_all, "recall_all_ci": wilson(sum(fires), sum(judged), ci),
        "negative_accuracy": neg, "negative_accuracy_ci": wilson(neg_ok, neg_n, ci), "negatives_judged": neg_n,
        "balanced_accuracy": (recall_all + neg) / 2 if recall_all is not None and neg is not None else None,
    }


def explain_and_score(samples: list[FeatureSample], explainer: ChatClient, scorer: ChatClient, *,
                      batch_contexts: int = 5, concurrency: int = 8, seed: int = 0, ci: float = 0.95,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Explain every feature, then score every explanation; one result dict per sample. Failed calls
    and unparseable answers are counted in the results, never raised."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(samples), desc="explain", unit="call")

    def call(client: ChatClient, messages: list[dict[str, str]]) -> str | None:
        try:
            return client.complete(messages)
        except LLMError:
            return None

    def explain(s: FeatureSample) -> str | None:
        return call(explainer, explainer_messages(s)) if s.explain else None

    answers = map_concurrent(explain, samples, concurrency, bar.update if bar else None)
    results, jobs = [], []
    for s, answer in zip(samples, answers, strict=True):
        explanation = parse_explanation(answer) if answer is not None else None
        status = ("no_examples" if not s.explain else "failed" if answer is None
                  else "ok" if explanation else "unparseable")
        contexts = [{"row": c.row, "decile": c.decile, "activation": c.activation, "text": c.text,
                     "marked": c.marked, "judged": None} for c in s.contexts]
        results.append({"feature": s.feature, "n_active": s.n_active, "max_activation": s.max_activation,
                        "status": status, "explanation": explanation, "explainer_answer": answer,
                        "explain_examples": [c.marked for c in s.explain], "contexts": contexts,
                        "failed": int(status == "failed"), "unparseable": int(status == "unparseable")})
        if explanation:
            order = np.random.default_rng([seed, s.feature, 1]).permutation(len(contexts)).tolist()
            jobs += [(len(results) - 1, order[i : i + batch_contexts]) for i in range(0, len(order), batch_contexts)]
    if bar:
        bar.reset(total=len(jobs))
        bar.set_description("score")

    def judge(job: tuple[int, list[int]]) -> str | None:
        res, idx = results[job[0]], job[1]
        return call(scorer, scorer_messages(res["explanation"], [res["contexts"][i]["text"] for i in idx]))

    for (r, idx), answer in zip(jobs, map_concurrent(judge, jobs, concurrency, bar.update if bar else None),
                                strict=True):
        flags = parse_judgments(answer, len(idx)) if answer is not None else None
        results[r]["failed"] += answer is None
        results[r]["unparseable"] += answer is not None and flags is None
        for i, flag in zip(idx, flags or [None] * len(idx), strict=True):
            results[r]["contexts"][i]["judged"] = flag
    if bar:
        bar.close()
    for res in results:
        res.update(feature_scores(res["contexts"], ci))
    return results


def _bootstrap(values: list[float], ci: float, n_boot: int, rng: np.random.Generator) -> dict[str, Any]:
    """Mean over features and its percentile-bootstrap interval (features resampled with replacement)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": len(v)}


def aggregate(results: list[dict[str, Any]], ci: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Every metric averaged over the scored features, with bootstrap intervals."""
    rng = np.random.default_rng([seed, 2])
    scored = [r for r in results if r["status"] == "ok"]
    return {
        "recall": [_bootstrap([r["recall"][d] for r in scored], ci, n_boot, rng) for d in range(N_DECILES)],
        **{k: _bootstrap([r[k] for r in scored], ci, n_boot, rng)
           for k in ("recall_all", "negative_accuracy", "balanced_accuracy")},
    }
