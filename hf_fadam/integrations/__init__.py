"""Integrations of FAdam with other libraries; the only part of hf_fadam that imports them.

- :mod:`hf_fadam.integrations.transformers`: ``--optim fadam`` for the Hugging Face Trainer (:func:`register`).
- :mod:`hf_fadam.integrations.autoload`: the start-up hook that the installed ``hf_fadam_autoload.pth`` runs; it
  imports only the standard library and calls :func:`register` once transformers loads its Trainer.

Nothing is imported here, so that ``import hf_fadam.integrations`` stays free.
"""
