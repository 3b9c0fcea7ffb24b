"""hf_fadam: the FAdam optimizer (Fisher Adam, arXiv:2405.12807) for PyTorch and the Hugging Face Trainer.

``import hf_fadam`` needs only torch; Triton and transformers are imported lazily where they are used.
"""

from .functional import fadam
from .optimizer import FAdam


__version__ = "0.1.0"

__all__ = ["FAdam", "fadam", "__version__"]
