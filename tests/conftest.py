"""Test-session setup. TRITON_INTERPRET must be set before anything imports triton (torch.compile included).

On a GPU machine run ``TRITON_INTERPRET=0 pytest`` to exercise the compiled Triton kernels for real.
"""

import os


os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
