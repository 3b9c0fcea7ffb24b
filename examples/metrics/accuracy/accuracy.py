# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Accuracy, an `evaluate` metric module shipped with the hf_fadam examples (loaded by path, offline).

The same inputs and output as the Hub's `accuracy` (`evaluate.load("accuracy")`) for single-label classification:

    accuracy = Σ_i w_i [prediction_i = reference_i] / Σ_i w_i        (w_i = 1 without `sample_weight`)

or, with `normalize=False`, the (weighted) number of correct predictions. Plain numpy; no scikit-learn needed.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "Accuracy: the (weighted) share of predictions equal to their reference."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
    normalize (`bool`, defaults to `True`): return the share; `False` returns the number of correct predictions.
    sample_weight (`list[float]`, *optional*): a weight per example.
Returns:
    `dict`: `{"accuracy": float}`.
Example:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions has shape {predictions.shape} but references has {references.shape}")
        weight = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        correct = float(np.sum(weight * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        if weight.sum() == 0:
            raise ValueError("accuracy of no examples (or zero total sample_weight) is undefined")
        return {"accuracy": correct / float(weight.sum())}
