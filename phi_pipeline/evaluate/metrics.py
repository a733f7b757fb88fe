"""Task metrics from the field's libraries: sacreBLEU (chrF, BLEU), rouge-score (ROUGE-L), scikit-learn
(accuracy, macro F1, the confusion table). Each takes the generated texts and the references, stripped."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from phi_pipeline.pipeline_spec.schema import METRIC_SCALES


def _same_length(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} hypotheses for {len(b)} references")


def _stripped(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    _same_length(hypotheses, references)
    return [h.strip() for h in hypotheses], [r.strip() for r in references]


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after stripping surrounding whitespace (0-1)."""
    hyps, refs = _stripped(hypotheses, references)
    return sum(h == r for h, r in zip(hyps, refs)) / len(refs) if refs else 0.0


def accuracy(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """scikit-learn's accuracy_score on the stripped labels (0-1)."""
    from sklearn.metrics import accuracy_score

    hyps, refs = _stripped(hypotheses, references)
    return float(accuracy_score(refs, hyps)) if refs else 0.0


def f1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Macro F1 over the reference labels (scikit-learn f1_score, average="macro"; an answer outside the labels
    counts against recall only), 0-1."""
    from sklearn.metrics import f1_score

    hyps, refs = _stripped(hypotheses, references)
    if not refs:
        return 0.0
    return float(f1_score(refs, hyps, labels=sorted(set(refs)), average="macro", zero_division=0))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus chrF (character n-grams 1-6, whitespace removed, beta 2), 0-100."""
    from sacrebleu.metrics import CHRF

    hyps, refs = _stripped(hypotheses, references)
    return float(CHRF().corpus_score(hyps, [refs]).score) if refs else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (13a tokenization, up to 4-grams, exponential smoothing), 0-100.

    effective_order: n-gram orders the corpus has none of are left out, so answers shorter than four words
    (labels, short phrases) are not scored 0 however right they are; with 4-gram-long text it is plain BLEU."""
    from sacrebleu.metrics import BLEU

    hyps, refs = _stripped(hypotheses, references)
    return float(BLEU(effective_order=True).corpus_score(hyps, [refs]).score) if refs else 0.0


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, its default tokenizer, no stemming), 0-1."""
    from rouge_score.rouge_scorer import RougeScorer

    hyps, refs = _stripped(hypotheses, references)
    if not refs:
        return 0.0
    scorer = RougeScorer(["rougeL"])
    return sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(refs)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_fields(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean share of each reference JSON object's fields that the answer, parsed as a JSON object, has with an
    equal value (0-1). An answer that is no JSON object scores 0; extra fields cost nothing, key order and
    spacing nothing. Field-level, so a one-field slip costs a third of a three-field row, not all of it."""
    _same_length(hypotheses, references)
    total = 0.0
    for h, r in zip(hypotheses, references):
        ref = _json_object(r)
        if not ref:
            raise ValueError(f"json_fields: the reference {r!r} is not a non-empty JSON object")
        got = _json_object(h.strip()) or {}
        total += sum(k in got and got[k] == v for k, v in ref.items()) / len(ref)
    return total / len(references) if references else 0.0


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "f1": f1,
    "chrf": chrf,
    "bleu": bleu,
    "rougeL": rouge_l,
    "json_fields": json_fields,
}
LABEL_METRICS = ("accuracy", "f1")

DEFINITIONS = {
    "exact_match": "share of examples whose generated text, stripped, equals the stripped reference (0-1)",
    "accuracy": "scikit-learn accuracy_score of the stripped answers against the stripped reference labels (0-1)",
    "f1": "scikit-learn macro F1 over the reference labels; other answers count against recall (0-1)",
    "chrf": "sacreBLEU corpus chrF (character n-grams 1-6, whitespace removed, beta=2), 0-100",
    "bleu": "sacreBLEU corpus BLEU (13a tokenizer, up to 4-grams, exp smoothing), 0-100",
    "rougeL": "mean rouge-score ROUGE-L F-measure (default tokenizer, no stemming), 0-1",
    "json_fields": "mean share of the reference JSON object's fields the answer's JSON object has with equal values (0-1)",
}


def score(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every named metric of the same outputs."""
    return {name: METRICS[name](hypotheses, references) for name in names}


def label_report(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """The confusion table (scikit-learn confusion_matrix; rows: reference labels, columns: the same labels
    and "(other)" for answers that are none of them) and per-label F1."""
    from sklearn.metrics import confusion_matrix, f1_score

    hyps, refs = _stripped(hypotheses, references)
    labels = sorted(set(refs))
    other = "(other)"
    mapped = [h if h in labels else other for h in hyps]
    matrix = confusion_matrix(refs, mapped, labels=[*labels, other])[: len(labels)]
    per_label = f1_score(refs, mapped, labels=labels, average=None, zero_division=0)
    return {
        "labels": labels,
        "columns": [*labels, other],
        "confusion": matrix.tolist(),
        "f1": {label: float(v) for label, v in zip(labels, per_label)},
    }


def fmt(metric: str, value: float | None) -> str:
    """A figure in its metric's units: two decimals on a 0-100 scale, three on 0-1."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if METRIC_SCALES.get(metric) == "0-100" else f"{value:.3f}"
