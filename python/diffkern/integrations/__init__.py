"""Adapters between diffkern ops and other libraries. Each one imports its library lazily
(only when the adapter module itself is imported), so diffkern never depends on them.

- :mod:`diffkern.integrations.transformers_attention`: ``dk.prefix_attention`` as a
  Hugging Face transformers attention implementation (``attn_implementation="diffkern_prefix"``).
"""
