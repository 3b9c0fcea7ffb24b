# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Perplexity from per-token negative log-likelihoods, an `evaluate` metric module shipped with the hf_fadam examples.

    perplexity = exp( Σ_tokens NLL / number of tokens )

where NLL = -log p(token | the tokens before it) in nats, pooled over every scored token of every sequence (the
corpus perplexity, which is what `exp(eval_loss)` gives when all batches hold the same number of tokens). `mean_nll`
is the exponent and `num_tokens` the number of tokens scored.

Not the Hub's `perplexity` module: that one downloads a causal LM by id and scores texts with it, and averages the
per-text perplexities. This one takes the NLLs a training loop already has, one list per sequence (e.g. from the
logits with `preprocess_logits_for_metrics`, see `examples/run_clm.py`), so it works offline on any model in memory.
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "Perplexity: exp of the mean per-token negative log-likelihood, pooled over all scored tokens."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per sequence, the negative log-likelihood (nats) of each scored token;
        leave out padding and other unscored positions.
Returns:
    `dict`: `{"perplexity": float, "mean_nll": float, "num_tokens": int}`.
Example:
    >>> perplexity = evaluate.load("examples/metrics/perplexity")
    >>> perplexity.compute(predictions=[[0.5, 1.5], [1.0]])
    {'perplexity': 2.718281828459045, 'mean_nll': 1.0, 'num_tokens': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions):
        nll = np.concatenate([np.asarray(p, dtype=np.float64) for p in predictions]) if len(predictions) else []
        if len(nll) == 0:
            raise ValueError("predictions hold no tokens: perplexity is undefined")
        mean_nll = float(np.mean(nll))
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": int(len(nll))}
