"""Canonical points: the quantities every Llama-family engine computes, named once, so two engines can be paired.

Engines compute the same things under different names and layouts (vLLM fuses q/k/v into one
projection, carries the residual stream as a ``(hidden, residual)`` pair, flattens tokens to
``[T, H]``). The canonical vocabulary is Hugging Face transformers' module tree (the reference
implementation of these models): a point is ``(module, part)`` with part ``input`` or ``output``,
one tensor each, rows = token positions. Each engine module says, per point, which of its own
entries hold it and which transform makes it canonical (:class:`Source`).

The canonical order below is execution order with nesting intact (a module's input, its children,
its output), which is what localization needs to tell a parent from its children.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: (module suffix inside ``model.layers.N``, parts) in execution order; "" is the layer itself.
LAYER_POINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("input",)),
    (".input_layernorm", ("input", "output")),
    (".self_attn", ("input",)),
    (".self_attn.q_proj", ("input", "output")),
    (".self_attn.k_proj", ("input", "output")),
    (".self_attn.v_proj", ("input", "output")),
    (".self_attn.o_proj", ("input", "output")),
    (".self_attn", ("output",)),
    (".post_attention_layernorm", ("input", "output")),
    (".mlp", ("input",)),
    (".mlp.gate_proj", ("input", "output")),
    (".mlp.up_proj", ("input", "output")),
    (".mlp.act_fn", ("input", "output")),
    (".mlp.down_proj", ("input", "output")),
    (".mlp", ("output",)),
    ("", ("output",)),
)

LOGITS = ("lm_head", "output")


def points(layers: int) -> Iterator[tuple[str, str]]:
    """Every canonical point of a model with ``layers`` decoder layers, in execution order."""
    yield "model.embed_tokens", "input"
    yield "model.embed_tokens", "output"
    for n in range(layers):
        for suffix, parts in LAYER_POINTS:
            for part in parts:
                yield f"model.layers.{n}{suffix}", part
    yield "model.norm", "input"
    yield "model.norm", "output"
    yield "lm_head", "input"
    yield LOGITS


@dataclass(frozen=True)
class Ref:
    """One entry of an engine's own dump: module path, part and argument path (``output.0`` → part output, path 0)."""

    module: str
    part: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.module} {self.part}{'.' + self.path if self.path else ''}"


@dataclass(frozen=True)
class Source:
    """How an engine's entries give one canonical point.

    ``refs``: the entries, all needed (``sum``) or the first one present (no transform).
    ``transform``: None (the tensor as is), ``"sum"`` (add the refs: vLLM's ``hidden + residual``) or
    ``"split"`` (take chunk ``index`` of the last dimension cut into ``sizes``: a fused projection).
    ``layout``: ``"tokens"`` (rows are token positions) or ``"logits"`` (one row per request, the
    engine's last-token logits).
    """

    refs: tuple[Ref, ...]
    transform: str | None = None
    sizes: tuple[int, ...] = ()
    index: int = 0
    layout: str = "tokens"

    def describe(self) -> str:
        """The engine's own name for this point, for reports."""
        if self.transform == "sum":
            return " + ".join(str(r) for r in self.refs)
        text = str(self.refs[0]) if len(self.refs) == 1 else " | ".join(str(r) for r in self.refs)
        if self.transform == "split":
            start = sum(self.sizes[:self.index])
            text += f"[..., {start}:{start + self.sizes[self.index]}]"
        return text


def one(module: str, part: str, *paths: str, layout: str = "tokens") -> Source:
    """A point held by one entry, at the first of ``paths`` the dump has (``""`` or ``"0"``...)."""
    return Source(tuple(Ref(module, part, p) for p in paths or ("",)), layout=layout)


def fused_sizes(config: dict[str, Any]) -> tuple[int, int, int]:
    """(q, k or v, gate or up) widths of fused projections: from ``q_size``/``kv_size``/``intermediate_size``,
    or from the head counts and head size of a model config."""
    if "q_size" in config:
        return int(config["q_size"]), int(config["kv_size"]), int(config["intermediate_size"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return heads * head_dim, kv_heads * head_dim, int(config["intermediate_size"])


def fused_projections(layer: str, qkv: Ref, gate_up: Ref, sizes: tuple[int, int, int]) -> dict[tuple[str, str], Source]:
    """q/k/v and gate/up points of ``layer`` taken from an engine's fused ``qkv_proj``/``gate_up_proj``
    (their input is the fused module's input, their output one chunk of its output's last dimension)."""
    q, kv, inter = sizes
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    sources: dict[tuple[str, str], Source] = {
        (f"{mlp}.act_fn", "input"): Source((gate_up,), "split", (inter, inter), 0),  # transformers' act_fn input
    }
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        sources[f"{attn}.{name}", "input"] = one(f"{attn}.qkv_proj", "input", "0")
        sources[f"{attn}.{name}", "output"] = Source((qkv,), "split", (q, kv, kv), i)
    for i, name in enumerate(("gate_proj", "up_proj")):
        sources[f"{mlp}.{name}", "input"] = one(f"{mlp}.gate_up_proj", "input", "0")
        sources[f"{mlp}.{name}", "output"] = Source((gate_up,), "split", (inter, inter), i)
    return sources
