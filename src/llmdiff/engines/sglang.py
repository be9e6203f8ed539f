"""SGLang (its dumper's non-intrusive mode, read by :mod:`llmdiff.store.formats.sglang`): canonical sources.

What SGLang's Llama-family modules see, measured on its 0.5.23 dumps (``../shared/fixtures``): tokens
flattened to ``[T, H]`` like vLLM; a decoder layer returns the **MLP output only** and the residual
stream travels beside it, so the stream leaving layer N is ``layers.N.mlp`` output +
``layers.N.post_attention_layernorm`` ``output.1`` (exactly transformers' ``hidden_states[N+1]`` in
float32); RMSNorm fused with the residual add takes ``(x, residual)`` and returns ``(normed,
residual_sum)``, so a layer's ``input_layernorm`` ``output.1`` is the stream entering it; ``qkv_proj`` and
``gate_up_proj`` are fused; ``act_fn`` (``SiluAndMul``) returns ``act(gate) * up``;
``logits_processor`` ``output.next_token_logits`` holds one row per request.
"""

from __future__ import annotations

from typing import Any

from llmdiff.engines.canonical import LOGITS, Ref, Source, fused_projections, fused_sizes, one


def canonical_sources(layers: int, config: dict[str, Any]) -> dict[tuple[str, str], Source]:
    """Where SGLang's dumps hold each canonical point. ``config`` gives the fused projections' widths."""
    sizes = fused_sizes(config)
    sources: dict[tuple[str, str], Source] = {
        ("model.embed_tokens", "input"): one("model.embed_tokens", "input", "0"),
        ("model.embed_tokens", "output"): one("model.embed_tokens", "output"),
    }

    def leaving(n: int) -> Source:  # the residual stream after layer n
        return Source((Ref(f"model.layers.{n}.mlp", "output", ""),
                       Ref(f"model.layers.{n}.post_attention_layernorm", "output", "1")), "sum")

    for n in range(layers):
        layer, attn, mlp = f"model.layers.{n}", f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        norm = f"{layer}.input_layernorm"
        entering = one(layer, "input", "1") if n == 0 else one(norm, "output", "1")
        qkv, gate_up = Ref(f"{attn}.qkv_proj", "output", ""), Ref(f"{mlp}.gate_up_proj", "output", "")
        sources.update({
            (layer, "input"): entering,
            (norm, "input"): entering,
            (norm, "output"): one(norm, "output", "", "0"),
            (attn, "input"): one(attn, "kwarg", "hidden_states"),
            (attn, "output"): one(attn, "output", "", "0"),
            (f"{attn}.o_proj", "input"): one(f"{attn}.o_proj", "input", "0"),
            (f"{attn}.o_proj", "output"): one(f"{attn}.o_proj", "output", "", "0"),
            (f"{layer}.post_attention_layernorm", "input"): one(f"{layer}.post_attention_layernorm", "output", "1"),
            (f"{layer}.post_attention_layernorm", "output"): one(f"{layer}.post_attention_layernorm", "output", "0"),
            (mlp, "input"): one(mlp, "input", "0"),
            # the decoder layer's own output is the MLP's: dumped for every layer even when the MLP is not
            (mlp, "output"): Source((Ref(mlp, "output", ""), Ref(layer, "output", ""))),
            (f"{mlp}.down_proj", "input"): one(f"{mlp}.down_proj", "input", "0"),
            (f"{mlp}.down_proj", "output"): one(f"{mlp}.down_proj", "output", "", "0"),
            (layer, "output"): leaving(n),
        })
        sources.update(fused_projections(layer, qkv, gate_up, sizes))
    sources["model.norm", "input"] = Source((Ref("model.norm", "input", "0"), Ref("model.norm", "input", "1")), "sum")
    sources["model.norm", "output"] = one("model.norm", "output", "0", "")
    sources["lm_head", "input"] = one("logits_processor", "input", "1")  # every token's hidden state: rows
    sources[LOGITS] = one("logits_processor", "output", "next_token_logits", layout="logits")
    return sources
