# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""F1 score, an `evaluate` metric module shipped with the hf_fadam examples (loaded by path, offline).

The same inputs and output as the Hub's `f1` (`evaluate.load("f1")`, which wraps `sklearn.metrics.f1_score`), in
plain numpy. For each label c, with (weighted) counts of true positives TP_c, false positives FP_c and false
negatives FN_c,

    F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)          (0 when the denominator is 0)

and `average` combines them: `"binary"` (default) reports F1 of `pos_label` only; `"macro"` the unweighted mean over
the labels; `"weighted"` the mean weighted by each label's number of references; `"micro"` pools the counts,
2 ΣTP / (2 ΣTP + ΣFP + ΣFN); `None` returns the per-label array. The labels are `labels` if given, else the sorted
union of the predicted and reference labels.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "F1 score, the harmonic mean of precision and recall, per label or averaged."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
    labels (`list[int]`, *optional*): the labels to score (and their order for `average=None`).
    pos_label (`int`, defaults to 1): the positive label for `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): `"binary"`, `"micro"`, `"macro"`, `"weighted"` or `None`.
    sample_weight (`list[float]`, *optional*): a weight per example.
Returns:
    `dict`: `{"f1": float}`, or `{"f1": numpy array}` with `average=None`.
Example:
    >>> f1 = evaluate.load("examples/metrics/f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], average="macro")
    {'f1': 0.7333333333333334}
"""

AVERAGES = ("binary", "micro", "macro", "weighted", None)


def per_label_counts(predictions, references, labels, weight):
    """(TP, FP, FN, support) per label in `labels`, each weighted by `weight`."""
    tp = np.array([np.sum(weight * ((predictions == c) & (references == c))) for c in labels], dtype=np.float64)
    fp = np.array([np.sum(weight * ((predictions == c) & (references != c))) for c in labels], dtype=np.float64)
    fn = np.array([np.sum(weight * ((predictions != c) & (references == c))) for c in labels], dtype=np.float64)
    support = np.array([np.sum(weight * (references == c)) for c in labels], dtype=np.float64)
    return tp, fp, fn, support


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions has shape {predictions.shape} but references has {references.shape}")
        weight = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        present = np.union1d(predictions, references)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs at most 2 labels, got {present.tolist()}; pass average='macro' or similar"
                )
            labels = [pos_label]
        elif labels is None:
            labels = present.tolist()
        tp, fp, fn, support = per_label_counts(predictions, references, np.asarray(labels), weight)
        if average == "micro":
            score = _ratio(np.array([2 * tp.sum()]), np.array([2 * tp.sum() + fp.sum() + fn.sum()]))[0]
            return {"f1": float(score)}
        per_label = _ratio(2 * tp, 2 * tp + fp + fn)
        if average is None:
            return {"f1": per_label}
        if average == "weighted":
            score = float(np.sum(per_label * support) / support.sum()) if support.sum() > 0 else 0.0
        else:  # binary (one label) or macro
            score = float(np.mean(per_label))
        return {"f1": score}
