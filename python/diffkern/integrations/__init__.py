"""Adapters between diffkern ops and other libraries. Each one imports its library lazily
(only when the adapter module itself is imported), so diffkern never depends on them.

- :mod:`diffkern.integrations.transformers_attention`: ``dk.prefix_attention`` as a
  Hugging Face transformers attention implementation (``attn_implementation="diffkern_prefix"``).
- :mod:`diffkern.integrations.transformers_zo`: ``ZOTrainer``, a ``transformers.Trainer``
  whose steps are zeroth-order ``dk.zo.ZOSGD`` steps (forward passes only), PEFT/LoRA models
  included, and ``TrainerZOSGD``, the optimizer it drives. Needs ``transformers`` and
  ``accelerate``.

``diffkern.integrations.ZOTrainer`` and ``.TrainerZOSGD`` resolve on first access, so a
missing optional dependency only fails (with an ImportError saying what to install) when used.
"""
from __future__ import annotations

import importlib

_LAZY = {"ZOTrainer": "transformers_zo", "TrainerZOSGD": "transformers_zo"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffkern.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
