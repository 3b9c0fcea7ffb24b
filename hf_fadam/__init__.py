"""hf_fadam: the FAdam optimizer (Fisher Adam, arXiv:2405.12807) for PyTorch and the Hugging Face Trainer.

``import hf_fadam`` needs only torch; Triton and transformers are imported lazily where they are used.
"""

from .functional import fadam
from .integrations import deepspeed as _deepspeed  # noqa: F401  (registers its engine hook; imports no deepspeed)
from .optimizer import FAdam
from .optimizer_8bit import FAdam8bit


__version__ = "0.1.0"

__all__ = ["FAdam", "FAdam8bit", "fadam", "register", "__version__"]


def register() -> bool:
    """Make ``--optim fadam`` available to the Hugging Face Trainer in this process (docs/trainer.md).

    Idempotent; imports transformers only when called. Returns False, changing nothing, where transformers
    already defines ``fadam`` itself.
    """
    from .integrations.transformers import register as _register

    return _register()
