"""``dk.prefix_attention`` inside Hugging Face transformers models.

Importing this module registers the attention implementation ``"diffkern_prefix"`` with
``transformers.AttentionInterface``; a model built with
``attn_implementation="diffkern_prefix"`` (or switched with ``model.set_attn_implementation``)
then runs packed shared-prefix batches: batch dim 1, the tokens of every group packed as
``[prefix, suffix_1, ..., suffix_G]`` (a ``dk.PrefixLayout``), position ids from the layout
(suffix positions restart at the prefix length, so RoPE sees each member as it would alone)::

    import diffkern as dk
    from diffkern.integrations import transformers_attention as dkt

    model = LlamaForCausalLM._from_config(cfg, attn_implementation=dkt.ATTN_IMPLEMENTATION)
    layout = dk.PrefixLayout.from_lengths(prefix_lens, suffix_lens, device=ids.device)
    out = model(input_ids=ids[None], **dkt.forward_kwargs(layout))   # ids: packed (T,)

How the layout reaches the attention layers: transformers forwards the model's extra
keyword arguments (``**kwargs`` of ``TransformersKwargs``) down to every attention function,
so ``prefix_layout=layout`` given to ``model(...)`` arrives in each layer; that is what
:func:`forward_kwargs` returns, with the position ids and ``use_cache=False``. Where a caller
cannot add keyword arguments (a trainer that calls ``model(**batch)``), ``with
dkt.prefix_layout(layout): model(...)`` sets it for the calls inside the block (a context
variable, so threads and asyncio tasks do not see each other's layout); a keyword argument
wins over the context.

What it does not do (each raises, naming it): attention dropout > 0, sliding windows,
logit soft-capping, a KV cache holding earlier tokens (decoding), batch dims other than 1.
The layout is the mask: do not pad, and pass no ``attention_mask``. transformers builds no
mask for an attention implementation that has no registered mask function (so no (T, T)
mask is ever materialized), which also means a 2-D padding mask given to the model is
dropped before it reaches the layers; a 4-D mask that does reach them is rejected.

Tested against transformers 5.x (the versions with ``AttentionInterface``, also 4.48+).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Optional

import torch

try:
    import transformers
    from transformers import AttentionInterface
except ImportError as e:  # transformers is optional: say which module needs what
    raise ImportError(
        "diffkern.integrations.transformers_attention needs Hugging Face transformers with "
        "AttentionInterface (transformers >= 4.48): pip install transformers") from e

ATTN_IMPLEMENTATION = "diffkern_prefix"
LAYOUT_KWARG = "prefix_layout"
DETERMINISTIC_KWARG = "prefix_attention_deterministic"

_current_layout: contextvars.ContextVar = contextvars.ContextVar("diffkern_prefix_layout",
                                                                 default=None)


@contextlib.contextmanager
def prefix_layout(layout):
    """Within the block, ``diffkern_prefix`` attention layers use ``layout`` when the model
    call passes none as the keyword argument ``prefix_layout``."""
    token = _current_layout.set(layout)
    try:
        yield layout
    finally:
        _current_layout.reset(token)


def forward_kwargs(layout, *, deterministic: bool = False) -> dict:
    """Keyword arguments for ``model(...)`` that run one packed shared-prefix batch:
    ``position_ids`` (1, T) from ``layout.position_ids()``, the layout itself, and
    ``use_cache=False`` (a KV cache would only hold a copy of the packed K/V)."""
    pos = layout.position_ids()
    kw = {"position_ids": pos.unsqueeze(0) if pos.dim() == 1 else pos,
          LAYOUT_KWARG: layout, "use_cache": False}
    if deterministic:
        kw[DETERMINISTIC_KWARG] = True
    return kw


def _kernel():
    import diffkern

    fn = getattr(diffkern, "prefix_attention", None)
    if fn is None:
        raise RuntimeError("diffkern_prefix attention: this diffkern has no prefix_attention "
                           "(a build without the shared-prefix attention family)")
    return fn


def diffkern_prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor,
                                      key: torch.Tensor, value: torch.Tensor,
                                      attention_mask: Optional[torch.Tensor],
                                      dropout: float = 0.0, scaling: Optional[float] = None,
                                      sliding_window: Optional[int] = None,
                                      softcap: Optional[float] = None, **kwargs: Any):
    """The attention function transformers calls in each layer.

    query (1, Hq, T, D), key/value (1, Hkv, T, D) as transformers gives them (after RoPE)
    -> (attn_output (1, T, Hq, D), None). The (T, H, D) views handed to the kernel are
    transposes, not copies (token stride D, head stride T * D, head dim contiguous)."""
    name = "diffkern_prefix attention"
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        layout = _current_layout.get()
    if layout is None:
        raise ValueError(f"{name}: no layout: pass {LAYOUT_KWARG}=dk.PrefixLayout(...) to the "
                         "model call (see forward_kwargs) or run it inside `with "
                         "diffkern.integrations.transformers_attention.prefix_layout(layout):`")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"{name}: expected a packed batch (batch dim 1, tokens along dim 1), "
                         f"got query of shape {tuple(query.shape)} (batch, heads, tokens, dim)")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{name}: key has {key.shape[2]} tokens but query {query.shape[2]}: "
                         "a KV cache of earlier tokens (decoding) is not supported; call the "
                         "model with use_cache=False")
    if attention_mask is not None:
        raise ValueError(f"{name}: got an attention_mask; the prefix layout is the mask, "
                         "call the model with attention_mask=None")
    if dropout:
        raise NotImplementedError(f"{name}: attention dropout ({dropout}) is not supported; "
                                  "set the config's attention_dropout to 0")
    if sliding_window is not None:
        raise NotImplementedError(f"{name}: sliding-window attention (window {sliding_window}) "
                                  "is not supported")
    if softcap is not None:
        raise NotImplementedError(f"{name}: logit soft-capping is not supported")
    q = query[0].transpose(0, 1)  # (T, Hq, D) views: no copy
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    extra = {"deterministic": True} if kwargs.get(DETERMINISTIC_KWARG) else {}
    out = _kernel()(q, k, v, layout, scale=scaling, **extra)
    return out.unsqueeze(0), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function under ``name`` (idempotent); returns ``name``."""
    AttentionInterface.register(name, diffkern_prefix_attention_forward)
    return name


register()

__all__ = ["ATTN_IMPLEMENTATION", "LAYOUT_KWARG", "DETERMINISTIC_KWARG", "prefix_layout",
           "forward_kwargs", "diffkern_prefix_attention_forward", "register", "transformers"]
