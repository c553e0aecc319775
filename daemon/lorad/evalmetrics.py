"""The numbers evaluate reports, each with a 95 % interval: one place for which library computes what.

Intervals of averages are a seeded percentile bootstrap over rows (reproducible run to run).

- loss / perplexity: mean negative log-likelihood per completion token (the tokens training
  scores), from each runtime's own logits; perplexity = exp(loss). Interval: bootstrap over rows.
- exact_match: the answer equals the reference after whitespace is collapsed. Wilson interval.
- chrf: sacrebleu's chrF (character n-gram F-score, β = 2) of each answer, averaged over rows.
  Character n-grams reward a nearly-right answer (a wrong literal, a missing clause) and need no
  tokenizer, so it works for code, SQL and any language; it is the WMT-recommended sacrebleu metric.
- rouge_l: rouge-score's ROUGE-L F-measure (longest common subsequence of words) per row,
  averaged; it follows the order of an answer, which chrF does not.
- bleu: sacrebleu's corpus BLEU (not a default: it is unstable on short answers). Bootstrap.
- execution: gretel rows only, `lorad score`'s rules (lorad.score).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from lorad.score import wilson

# Every number eval.json reports per model: its label, and whether lower is better. Report, compare
# and the deltas all read this; the scores after perplexity are proportions (0–1).
REPORTED = {
    "loss": ("held-out loss", True),
    "perplexity": ("perplexity", True),
    "execution_accuracy": ("execution accuracy", False),
    "exact_match": ("exact match", False),
    "chrf": ("chrF", False),
    "rouge_l": ("ROUGE-L", False),
    "bleu": ("BLEU", False),
}
SCORES = {k: label for k, (label, _) in REPORTED.items() if k not in ("loss", "perplexity")}
DEFAULT_METRICS = {
    "gretel": ["loss", "execution", "exact_match", "chrf", "rouge_l"],
    "completions": ["loss", "exact_match", "chrf", "rouge_l"],
    "chat": ["loss", "exact_match", "chrf", "rouge_l"],
    "text": ["loss", "chrf", "rouge_l"],
}
BOOTSTRAP_SAMPLES = 1000
SEED = 0


def metrics_for(fmt: str, requested: Sequence[str] | None) -> list[str]:
    """The spec's evaluate.metrics, else the format's defaults; execution only where rows can execute."""
    chosen = list(requested) if requested else DEFAULT_METRICS[fmt]
    return [m for m in chosen if m != "execution" or fmt == "gretel"]


def metric_value(summary: dict[str, Any], metric: str) -> tuple[float | None, list[float] | None]:
    """(value, 95 % interval) of one metric in a model's summary, whichever shape eval.json keeps it in."""
    v = summary.get(metric)
    if isinstance(v, dict):
        return v.get("value"), v.get("ci95")
    return v, summary.get(f"{metric}_ci95")


def normalize(text: str) -> str:
    return " ".join(text.split())


def bootstrap_ci(n: int, statistic: Callable[[list[int]], float], samples: int = BOOTSTRAP_SAMPLES) -> list[float] | None:
    """Percentile 95 % interval of `statistic` over rows resampled with replacement (seeded: reproducible)."""
    if n < 2:
        return None
    rng = random.Random(SEED)
    values = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(samples))
    return [round(values[int(0.025 * (samples - 1))], 4), round(values[int(0.975 * (samples - 1))], 4)]


def _mean(values: Sequence[float]) -> Callable[[list[int]], float]:
    return lambda idx: sum(values[i] for i in idx) / len(idx)


def loss_summary(nll: Sequence[float], tokens: Sequence[int]) -> dict[str, Any]:
    """Token-weighted mean NLL over rows (each row: summed NLL, token count) and its perplexity."""
    total = sum(tokens)
    if not total:
        return {"loss": None, "perplexity": None, "tokens": 0}

    def mean_nll(idx: list[int]) -> float:
        count = sum(tokens[i] for i in idx)
        return sum(nll[i] for i in idx) / count if count else float("nan")

    loss = mean_nll(list(range(len(nll))))
    ci = bootstrap_ci(len(nll), mean_nll, samples=400)
    return {"loss": round(loss, 4), "loss_ci95": ci, "perplexity": round(math.exp(min(loss, 700)), 4),
            "perplexity_ci95": [round(math.exp(min(x, 700)), 4) for x in ci] if ci else None, "tokens": total}


def row_scores(prediction: str, reference: str, metrics: Sequence[str]) -> dict[str, float]:
    """Per-row generation scores (0–1), kept with each row so the report can pick wins and losses."""
    out: dict[str, float] = {}
    if "exact_match" in metrics:
        out["exact_match"] = float(normalize(prediction) == normalize(reference))
    if "chrf" in metrics:
        from sacrebleu.metrics import CHRF

        out["chrf"] = round(CHRF().sentence_score(prediction, [reference]).score / 100, 4)
    if "rouge_l" in metrics:
        out["rouge_l"] = round(_rouge().score(reference, prediction)["rougeL"].fmeasure, 4)
    return out


_ROUGE: Any = None


def _rouge() -> Any:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE


def generation_summary(predictions: Sequence[str], references: Sequence[str], scores: Sequence[dict[str, float]],
                       metrics: Sequence[str]) -> dict[str, Any]:
    """Each chosen generation metric over all rows: value and 95 % interval."""
    n = len(predictions)
    out: dict[str, Any] = {}
    if not n:
        return out
    if "exact_match" in metrics:
        hits = int(sum(s["exact_match"] for s in scores))
        out["exact_match"] = {"value": round(hits / n, 4), "ci95": wilson(hits, n), "matches": hits}
    for name in ("chrf", "rouge_l"):
        if name in metrics:
            values = [s[name] for s in scores]
            out[name] = {"value": round(sum(values) / n, 4), "ci95": bootstrap_ci(n, _mean(values))}
    if "bleu" in metrics:
        from sacrebleu.metrics import BLEU

        bleu = BLEU(effective_order=True)

        def corpus_bleu(idx: list[int]) -> float:
            return float(bleu.corpus_score([predictions[i] for i in idx], [[references[i] for i in idx]]).score) / 100

        out["bleu"] = {"value": round(corpus_bleu(list(range(n))), 4), "ci95": bootstrap_ci(n, corpus_bleu, samples=200)}
    return out
