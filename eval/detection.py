"""Detection scoring (Juang et al. 2024), the LLM side of `eval.autointerp`: plain-text samples of
features in, explanations and per-decile detection scores out. Needs no SAE: `explain_and_score`
takes `FeatureSample`s and two `ChatClient`s (eval/llm.py).

    explainer prompt  top contexts with active tokens marked <<like this>> and 0-10 strengths
    scorer prompt     the explanation + ~5 shuffled unmarked contexts -> "k: yes|no" lines (or a
                      JSON list of 0/1; one context: yes or no); unparseable answers are counted
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

# The scorer is asked for one verdict per excerpt, one line each ("2: no"), and the question is
# repeated after the excerpts (small models answer the last thing they read); a single excerpt is a
# plain yes/no question. parse_judgments also reads a JSON list of 0/1, which larger models often give.
SCORER_SYSTEM = (
    "You are checking an explanation of one feature of a language model. The feature is active on some "
    "tokens of some texts. You will get the explanation and {excerpts}. For {each}, decide whether the "
    "feature, as explained, is active on at least one of its tokens. {reply}")
REPLY_MANY = ("Reply with exactly {n} lines, one per excerpt in order, each of the form "
              "\"<excerpt number>: yes\" or \"<excerpt number>: no\". For example:\n{example}\nWrite nothing else.")
REPLY_ONE = "Reply with only yes or no."
QUESTION_MANY = "Is the feature active in each excerpt? Answer with {n} lines, from \"1: yes\" or \"1: no\" to \"{n}: ...\"."
QUESTION_ONE = "Is the feature active in this excerpt? Answer yes or no."


def explainer_messages(sample: FeatureSample) -> list[dict[str, str]]:
    top = max(sample.max_activation, 1e-12)
    parts = []
    for i, c in enumerate(sample.explain, start=1):
        strengths = ", ".join(f"{json.dumps(p, ensure_ascii=False)} {round(10 * v / top)}" for p, v in c.tokens)
        parts.append(f"Excerpt {i}: {c.marked}\nActive tokens: {strengths}")
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)}]


def scorer_messages(explanation: str, texts: list[str]) -> list[dict[str, str]]:
    """The scorer's prompt: the explanation, the numbered excerpts, then the question."""
    n = len(texts)
    body = "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, start=1))
    if n == 1:
        system = SCORER_SYSTEM.format(excerpts="one text excerpt", each="the excerpt", reply=REPLY_ONE)
        question = QUESTION_ONE
    else:
        example = "\n".join(f"{i}: {'yes' if i % 2 else 'no'}" for i in range(1, n + 1))
        system = SCORER_SYSTEM.format(excerpts=f"{n} numbered text excerpts", each="each excerpt",
                                      reply=REPLY_MANY.format(n=n, example=example))
        question = QUESTION_MANY.format(n=n)
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{body}\n\n{question}"}]


def _strip_reasoning(text: str) -> str:
    return re.sub(r"(?s)<think>.*?(</think>|$)", "", text)


# a line that repeats the explainer prompt's own scaffolding ("Excerpt 2: ...", "Active tokens: ...")
_ECHO = re.compile(r"(?i)^(?:excerpt\s*\d+\s*[:.)]|active tokens\s*:)")


def parse_explanation(text: str) -> str | None:
    """The first line after the last "Explanation:" (or of the whole answer) that is not an echo of
    the prompt's excerpts; None if there is none (a model that only copies its excerpts back)."""
    text = _strip_reasoning(text)
    if found := list(re.finditer(r"(?i)explanation\s*:", text)):
        text = text[found[-1].end():]
    lines = [line.strip().strip("*\"'` ").strip() for line in text.strip().splitlines()]
    return next((line for line in lines if line and not _ECHO.match(line)), None)


_YES = {"1": 1, "yes": 1, "true": 1, "0": 0, "no": 0, "false": 0}
# "2: no", "Excerpt 2: Yes, ...", "- 2) no", "**2.** yes": a verdict on the line of its excerpt number
_LINE = re.compile(r"(?im)^[\s*#-]*(?:excerpt|context)?\s*#?(\d+)\s*\**\s*[:.)=-]\s*\**\s*(yes|no|true|false|1|0)\b")
# a reply to a single yes/no question that starts with its verdict: "No, the feature ...", "**Yes**"
_FIRST_WORD = re.compile(r"(?i)^[\s*\"'`]*(?:answer\s*:\s*)?[\s*\"'`]*(yes|no)\b")


def _flag(v: Any) -> int | None:
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
        return int(v)
    return _YES.get(v.strip().lower()) if isinstance(v, str) else None


def parse_judgments(text: str, n: int) -> list[int] | None:
    """n 0/1 verdicts, or None if the answer does not give exactly one for every excerpt. Read, in this
    order: a JSON list of n verdicts (the last one), "k: yes" / "k: no" lines for k = 1..n (each number
    once, or always with the same verdict), and for n == 1 an answer whose first word is yes or no.
    Anything else (an echo of the excerpts, a verdict missing, two different verdicts for one
    excerpt) is unparseable: never guessed."""
    text = _strip_reasoning(text)
    for m in reversed(list(re.finditer(r"\[[^\[\]]*\]", text))):
        try:
            items = json.loads(m.group(0))
        except ValueError:
            continue
        flags = [_flag(v) for v in items]
        if len(flags) == n and None not in flags:
            return flags  # type: ignore[return-value]
    lines: dict[int, set[int]] = {}
    for m in _LINE.finditer(text):
        lines.setdefault(int(m.group(1)), set()).add(_YES[m.group(2).lower()])
    if set(lines) == set(range(1, n + 1)) and all(len(v) == 1 for v in lines.values()):
        return [lines[i].pop() for i in range(1, n + 1)]
    if n == 1 and not lines and (m := _FIRST_WORD.match(text)):
        return [_YES[m.group(1).lower()]]
    return None


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
    and unparseable answers are counted in the results, never raised. Interrupted (Ctrl-C, an error),
    both clients are cancelled, so that calls still running give up at their next attempt."""
    try:
        return _explain_and_score(samples, explainer, scorer, batch_contexts, concurrency, seed, ci, progress)
    except BaseException:
        explainer.cancel()
        scorer.cancel()
        raise


def _explain_and_score(samples: list[FeatureSample], explainer: ChatClient, scorer: ChatClient, batch_contexts: int,
                       concurrency: int, seed: int, ci: float, progress: bool) -> list[dict[str, Any]]:
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
                        "failed": int(status == "failed"), "unparseable": int(status == "unparseable"),
                        "scorer_answers": 0, "scorer_unparseable": 0})
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
        results[r]["scorer_answers"] += answer is not None
        results[r]["scorer_unparseable"] += answer is not None and flags is None
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
