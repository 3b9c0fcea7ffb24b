# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` metric modules shipped with the hf_fadam examples, and `load_metric` to load one.

`evaluate.load("wer")` fetches the metric's script from the Hugging Face Hub, so it fails without network (there is
no pip-installable copy). The examples therefore ship their metrics here, one folder per metric with a script of the
same name, which `evaluate.load(<folder>)` loads offline:

    accuracy/accuracy.py   f1/f1.py   wer/wer.py   cer/cer.py   perplexity/perplexity.py

`accuracy`, `f1`, `wer` and `cer` take the same inputs and return the same outputs as the Hub modules of those
names. `perplexity` does not: the Hub's `perplexity` downloads a model by id and scores texts with it, while this one
takes the per-token negative log-likelihoods that a training loop already has (see its docstring), so it is always
loaded from here.

`load_metric(name)` picks the source:

- `source="auto"` (default): the Hub id when online, this folder when offline. Offline means `HF_HUB_OFFLINE` or
  `HF_EVALUATE_OFFLINE` is set to a true value (1/ON/YES/TRUE), or the Hub load fails (then a warning is logged);
- `source="local"`: always this folder;
- `source="hub"`: always the Hub id (errors are raised).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import evaluate


logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent
# Metrics whose shipped module is interchangeable with the Hub module of the same id.
HUB_COMPATIBLE = ("accuracy", "f1", "wer", "cer")
SOURCES = ("auto", "local", "hub")
_TRUE = {"1", "ON", "YES", "TRUE"}


def shipped_metrics() -> list[str]:
    """Names of the metric modules in this folder."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def is_offline() -> bool:
    """Whether the environment asks for no Hub access (`HF_HUB_OFFLINE` or `HF_EVALUATE_OFFLINE`)."""
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def load_metric(name: str, source: str = "auto", **kwargs) -> evaluate.EvaluationModule:
    """Load the metric `name` with `evaluate.load`, from this folder or by Hub id (see the module docstring).

    `kwargs` go to `evaluate.load` (e.g. `experiment_id`); `keep_in_memory` defaults to True, so that no cache file
    is written and processes that compute metrics at the same time do not share one.
    """
    kwargs.setdefault("keep_in_memory", True)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    local = METRICS_DIR / name
    if not (local / f"{name}.py").is_file() and source != "hub":
        raise ValueError(f"name: no metric module {name!r} in {METRICS_DIR} (shipped: {', '.join(shipped_metrics())})")
    if source == "local" or name not in HUB_COMPATIBLE or (source == "auto" and is_offline()):
        return evaluate.load(str(local), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception as error:  # no network, Hub down, or an incompatible Hub script (e.g. jiwer 4 and `wer`)
        if source == "hub":
            raise
        logger.warning("evaluate.load(%r) failed (%s); using the shipped module %s", name, error, local)
        return evaluate.load(str(local), **kwargs)
