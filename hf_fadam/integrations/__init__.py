"""Integrations of FAdam with other libraries; the only part of hf_fadam that imports them.

- :mod:`hf_fadam.integrations.transformers`: ``--optim fadam`` for the Hugging Face Trainer (:func:`register`).
- :mod:`hf_fadam.integrations.deepspeed`: FAdam as DeepSpeed ZeRO's client optimizer, exact (its flat partitions
  mapped back to parameters through :mod:`hf_fadam._flat`); imports deepspeed only when it patches it.
- :mod:`hf_fadam.integrations.autoload`: the start-up hook that the installed ``hf_fadam_autoload.pth`` runs; it
  imports only the standard library and calls :func:`register` once transformers loads its Trainer.

Nothing is imported here, so that ``import hf_fadam.integrations`` stays free.
"""
