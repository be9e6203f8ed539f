"""Hugging Face transformers: the reference layout of the canonical points (see :mod:`llmdiff.engines.canonical`).

Its modules are the canonical vocabulary, so each point is the module's own input (``input.0``, or
the keyword ``hidden_states``) or output (a bare tensor, or the first item of a tuple). Tensors are
``[batch, seq, ...]``: row ``b`` of the batch is one request, the sequence dimension its positions.
During ``generate`` the logits are computed for the last position only (``lm_head`` output
``[batch, 1, vocab]``); a teacher-forced forward pass gives every position.
"""

from __future__ import annotations

from typing import Any

from llmdiff.engines.canonical import LOGITS, Ref, Source, one, points


def canonical_sources(layers: int, config: dict[str, Any]) -> dict[tuple[str, str], Source]:
    """Where each canonical point sits in a transformers dump of a Llama-family model (``config`` unused:
    transformers does not fuse projections)."""
    del config
    sources: dict[tuple[str, str], Source] = {}
    for module, part in points(layers):
        if part == "input":
            sources[module, part] = Source((Ref(module, "input", "0"), Ref(module, "kwarg", "hidden_states")))
        else:
            sources[module, part] = one(module, "output", "", "0")
    sources[LOGITS] = Source((Ref("lm_head", "output", ""), Ref("", "output", "logits")))
    return sources
