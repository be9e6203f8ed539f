"""vLLM: where its steps are, which passes are warm-ups, which token rows belong to which request.

A vLLM *step* is one call of the model runner's ``execute_model``: the model's forward pass over the
flattened tokens of every scheduled request, then ``compute_logits`` (the ``logits_processor``), which
runs outside the model's own forward. So an outermost module call is not a step here. Warm-up,
profiling and dummy passes call the model outside ``execute_model`` and are not steps: nothing of
them is recorded. A step that scheduled no tokens runs no forward pass and is not a step either.

vLLM offers no hook for step boundaries, so the runner instance's ``execute_model`` attribute is
wrapped while the capture runs (one attribute on one object, removed on stop; the class is not
touched). The runner is found either from a ``vllm.LLM`` object (in-process engines) or, for a model
discovered at its first forward (``llmdiff run``, any process layout), from the call stack: the
frame whose ``self`` holds the model.

Per step the dump records, for the rows of the flattened token dimension ``[T, ...]``: each
request's id, arrival order, first row and row count, tokens computed before this step, prompt
length and the row of the step's logits it owns, plus every row's position and token id.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import TYPE_CHECKING, Any

from llmdiff.engines import Shard
from llmdiff.engines.canonical import LOGITS, Ref, Source, fused_projections, fused_sizes, one

if TYPE_CHECKING:
    from torch import nn

    from llmdiff.capture.session import Capture

#: What the model config says about shapes, kept so a later compare can split fused projections.
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings")


def resolve(obj: Any) -> tuple[nn.Module, Any] | None:
    """For a ``vllm.LLM`` running in this process: its model and its model runner."""
    if not type(obj).__module__.startswith("vllm."):
        return None
    try:
        core = obj.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        model = runner.get_model()
    except AttributeError:
        from llmdiff.errors import LlmdiffError

        raise LlmdiffError("this vllm.LLM runs its model in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                           "to capture it from Python, or capture every process with llmdiff run") from None
    return model, runner


def _holds(runner: Any, model: nn.Module) -> bool:
    held = runner.__dict__.get("model") if hasattr(runner, "__dict__") else None
    return held is model or getattr(held, "module", None) is model  # plain, or inside a graph wrapper


def _find_runner(model: nn.Module, frame: FrameType | None) -> tuple[Any, dict[str, Any] | None]:
    """The object on the call stack whose ``execute_model`` runs ``model``, and the local variables of that
    ``execute_model`` call when this pass is inside one (None for a warm-up pass)."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and callable(getattr(type(owner), "execute_model", None)) and _holds(owner, model):
            while frame is not None:
                if frame.f_code.co_name == "execute_model" and frame.f_locals.get("self") is owner:
                    return owner, dict(frame.f_locals)
                frame = frame.f_back
            return owner, None
        frame = frame.f_back
    return None, None


class VllmSteps:
    """Marks vLLM engine steps for one capture (see the module docstring)."""

    def __init__(self, capture: Capture, model: nn.Module, runner: Any = None) -> None:
        self.capture = capture
        self.model = model
        self.runner: Any = None
        self._original: Any = None
        self._looked_up = False
        self._in_step = False
        self._forwards = 0
        self._token_ids: list[int] | None = None
        self._positions: list[int] | None = None
        self._arrival: dict[str, int] = {}
        self._open_call: dict[str, Any] = {}
        if runner is not None:
            self._wrap(runner)

    # -- attaching -----------------------------------------------------------------------------------
    def _wrap(self, runner: Any) -> None:
        self._looked_up = True
        self.runner = runner
        self._original = runner.__dict__.get("execute_model")
        steps = self
        bound = runner.execute_model

        def execute_model(*args: Any, **kwargs: Any) -> Any:
            steps._begin()
            try:
                return bound(*args, **kwargs)
            finally:
                steps._end(args, kwargs)

        execute_model.__llmdiff__ = True  # type: ignore[attr-defined]
        runner.execute_model = execute_model

    def detach(self) -> None:
        if self._in_step and self._open_call:  # the step found open on the call stack is over by now
            self._end((self._open_call.get("scheduler_output"),), {})
        runner, self.runner = self.runner, None
        if runner is None:
            return
        current = runner.__dict__.get("execute_model")
        if getattr(current, "__llmdiff__", False):
            if self._original is None:
                del runner.execute_model
            else:
                runner.execute_model = self._original

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": "vllm", "version": getattr(sys.modules.get("vllm"), "__version__", None)}
        try:
            from vllm.distributed import parallel_state as ps

            info["tp_rank"] = int(ps.get_tensor_model_parallel_rank())
            info["tp_size"] = int(ps.get_tensor_model_parallel_world_size())
        except Exception:  # not initialized (a bare model outside an engine)
            pass
        config = getattr(getattr(self.model, "config", None), "to_dict", None)
        if callable(config):
            values = config()
            info["config"] = {k: values[k] for k in _CONFIG_KEYS if k in values}
        layout = parallel_layout(self.model)
        if layout:
            info["parallel"] = layout
        return info

    # -- steps ---------------------------------------------------------------------------------------
    def _begin(self) -> None:
        if self._in_step:  # a step opened from the call stack (capture started mid-step) ends here
            self._end((self._open_call.get("scheduler_output"),), {})
        self._in_step = True
        self._forwards = 0
        self._token_ids = self._positions = None
        self.capture.engine_step_begin()

    def _end(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._in_step:
            return
        self._in_step = False
        self._open_call = {}
        if self._forwards == 0:  # nothing was scheduled: no forward pass, no step
            self.capture.engine_step_discard()
            return
        scheduler_output = args[0] if args else kwargs.get("scheduler_output")
        try:
            metadata = self._metadata(scheduler_output)
        except Exception as exc:  # metadata is a bonus; the step's tensors stay usable without it
            metadata = {"requests_note": f"request metadata unavailable: {type(exc).__name__}: {exc}"}
        self.capture.engine_step_end(metadata)

    def root_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._looked_up and module is self.model:
            self._looked_up = True
            runner, open_call = _find_runner(self.model, sys._getframe(1))
            if runner is None:
                warnings.warn("llmdiff: a vLLM model was called outside a vLLM model runner; its calls are "
                              "captured as plain forward passes (one step each)", stacklevel=2)
                self.capture.engine_steps_unavailable()
                return
            self._wrap(runner)
            if open_call is not None:  # first seen inside a real step: it counts, and ends at the next one
                self._begin()
                self._open_call = open_call
        if not self._in_step:
            return
        self._forwards += 1
        if module is self.model and self._token_ids is None:
            # The model's first call in a process reaches llmdiff through a global hook, which sees no
            # keyword arguments; the runner's own locals hold the same tensors then.
            given = kwargs or self._open_call
            self._token_ids = _int_list(given.get("input_ids"))
            self._positions = _int_list(given.get("positions"))

    def _metadata(self, scheduler_output: Any) -> dict[str, Any]:
        scheduled: dict[str, int] = dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {})
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:  # FCFS order = arrival order
            self._arrival.setdefault(str(new.req_id), len(self._arrival))
        batch = getattr(self.runner, "input_batch", None)
        order = [r for r in (batch.req_ids if batch is not None else scheduled) if r in scheduled]
        total = sum(scheduled[r] for r in order)
        positions = None if self._positions is None else self._positions[:total]
        requests, start = [], 0
        states = getattr(self.runner, "requests", {}) or {}
        for row, req_id in enumerate(order):
            count = scheduled[req_id]
            self._arrival.setdefault(req_id, len(self._arrival))
            state = states.get(req_id)
            requests.append({
                "id": req_id, "arrival": self._arrival[req_id], "start": start, "rows": count,
                "computed": positions[start] if positions and start < len(positions) else None,
                "prompt_tokens": getattr(state, "num_prompt_tokens", None), "logits_row": row,
            })
            start += count
        return {"requests": requests, "positions": positions,
                "token_ids": None if self._token_ids is None else self._token_ids[:total]}


def _int_list(value: Any) -> list[int] | None:
    import torch  # here, not at the top: a compare asks this module for canonical points and shards, without torch

    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 1:
        return [int(v) for v in value.tolist()]
    return None


# -- canonical points (what a cross-engine compare pairs) -------------------------------------------------

#: vLLM's tensor-parallel layer classes (found in a module's class hierarchy) and what their kind means for
#: the tensors a hook sees: ``column`` splits the output's last dimension (``qkv`` and ``merged_column``
#: into the listed per-rank parts), ``row`` takes a split input and returns the reduced (replicated)
#: output, ``vocab_embedding`` returns reduced rows, ``lm_head`` is only a weight (logits are gathered).
_PARALLEL_KINDS = (("QKVParallelLinear", "qkv"), ("MergedColumnParallelLinear", "merged_column"),
                   ("ColumnParallelLinear", "column"), ("RowParallelLinear", "row"),
                   ("ParallelLMHead", "lm_head"), ("VocabParallelEmbedding", "vocab_embedding"))
#: the attributes of those modules kept for an un-shard (only ints, bools and lists of ints)
_PARALLEL_ATTRS = ("tp_rank", "tp_size", "input_size_per_partition", "output_size_per_partition",
                   "output_partition_sizes", "gather_output", "reduce_results", "input_is_parallel",
                   "total_num_heads", "total_num_kv_heads", "num_heads", "num_kv_heads", "head_size",
                   "v_head_size", "num_kv_head_replicas", "num_embeddings", "num_embeddings_per_partition",
                   "org_vocab_size", "embedding_dim")


def parallel_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """For every tensor-parallel module of a vLLM model, by path: its parallel kind, rank, TP size and
    partition sizes, read from the module's own attributes at capture time (never guessed from shapes)."""
    layout: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        classes = {c.__name__ for c in type(module).__mro__}
        kind = next((k for name, k in _PARALLEL_KINDS if name in classes), None)
        if kind is None:
            continue
        info: dict[str, Any] = {"kind": kind, "class": type(module).__name__}
        for attr in _PARALLEL_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, (bool, int)) or (isinstance(value, (list, tuple))
                                                   and all(isinstance(v, int) for v in value)):
                info[attr] = list(value) if isinstance(value, tuple) else value
        shard = getattr(module, "shard_indices", None)  # the vocabulary range this rank holds
        start, end = getattr(shard, "org_vocab_start_index", None), getattr(shard, "org_vocab_end_index", None)
        if isinstance(start, int) and isinstance(end, int):
            info["vocab_range"] = [start, end]
        if kind in ("qkv", "merged_column", "column"):
            info["shard_dim"] = None if info.get("gather_output") else -1  # of the output
        elif kind == "row":
            info["shard_dim"] = -1 if info.get("input_is_parallel", True) else None  # of the input
        else:
            info["shard_dim"] = 0  # of the weight: rows of the vocabulary
        layout[path] = info
    return layout


def shard_of(module: str, part: str, path: str, layout: dict[str, dict[str, Any]]) -> Shard | None:
    """How vLLM's tensor-parallel ranks split the entry ``module part.path`` (see :class:`Shard`).

    Parallel layers say it themselves (:func:`parallel_layout`): a column-parallel output is this rank's
    slice of each fused part, a row-parallel input is a slice, a row-parallel output is reduced (or a
    partial sum when ``reduce_results`` is off). Three modules between them record nothing and work on
    the shards they are handed: ``attn`` (q, k, v heads in, this rank's heads out) and ``rotary_emb``
    (q, k) take ``qkv_proj``'s parts, ``act_fn`` takes ``gate_up_proj``'s and returns one part.
    """
    output = part == "output" and path in ("", "0")
    info = layout.get(module)
    if info is not None:
        kind = info.get("kind")
        if kind in ("qkv", "merged_column", "column") and output and info.get("shard_dim") == -1:
            widths = info.get("output_partition_sizes") if kind != "column" else None
            widths = widths or [info.get("output_size_per_partition")]
            return Shard(tuple(int(w) for w in widths)) if all(isinstance(w, int) for w in widths) else None
        if kind == "row" and part == "input" and path == "0" and info.get("shard_dim") == -1:
            width = info.get("input_size_per_partition")
            return Shard((width,)) if isinstance(width, int) else None
        if kind == "row" and output and info.get("reduce_results") is False:
            return Shard(combine="sum")
        return None
    parent, _, leaf = module.rpartition(".")
    if leaf in ("attn", "rotary_emb"):
        qkv = layout.get(f"{parent}.qkv_proj", {}).get("output_partition_sizes")
        if not (isinstance(qkv, list) and len(qkv) == 3):
            return None
        q, k, v = qkv
        held = ({("input", "0"): q, ("input", "1"): k, ("input", "2"): v, ("output", ""): q} if leaf == "attn"
                else {("input", "1"): q, ("input", "2"): k, ("output", "0"): q, ("output", "1"): k})
        width = held.get((part, path))
        return None if width is None else Shard((width,))
    if leaf == "act_fn":
        gate_up = layout.get(f"{parent}.gate_up_proj", {}).get("output_partition_sizes")
        if not (isinstance(gate_up, list) and gate_up):
            return None
        if part == "input" and path == "0":
            return Shard(tuple(gate_up))
        return Shard((gate_up[0],)) if output else None
    return None


def canonical_sources(layers: int, config: dict[str, Any]) -> dict[tuple[str, str], Source]:
    """Where vLLM's Llama-family modules hold each canonical point, and how to make it canonical.

    Rows are the flattened tokens of a step (``[T, ...]``; the step's request metadata says whose);
    the logits are one row per request. Fused modules are split by the model config's sizes:
    ``qkv_proj`` → q, k, v; ``gate_up_proj`` → gate, up. The residual stream is ``hidden + residual``
    of a decoder layer's output; the post-attention norm's fused add returns it as ``output.1``.
    vLLM has no ``act_fn`` output of its own (``SiluAndMul`` returns ``act(gate) * up``, the
    ``down_proj`` input), so that point stays one-sided.
    """
    sizes = fused_sizes(config)
    sources: dict[tuple[str, str], Source] = {
        ("model.embed_tokens", "input"): one("model.embed_tokens", "input", "0"),
        ("model.embed_tokens", "output"): one("model.embed_tokens", "output"),
    }

    def stream(n: int) -> Source:  # the residual stream leaving layer n
        layer = f"model.layers.{n}"
        return Source((Ref(layer, "output", "0"), Ref(layer, "output", "1")), "sum")

    for n in range(layers):
        layer = f"model.layers.{n}"
        entering = one(layer, "input", "1") if n == 0 else stream(n - 1)
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        qkv = Ref(f"{attn}.qkv_proj", "output", "0")
        gate_up = Ref(f"{mlp}.gate_up_proj", "output", "0")
        sources.update({
            (layer, "input"): entering,
            (f"{layer}.input_layernorm", "input"): entering,
            (f"{layer}.input_layernorm", "output"): one(f"{layer}.input_layernorm", "output", "", "0"),
            (attn, "input"): one(attn, "kwarg", "hidden_states"),
            (attn, "output"): one(attn, "output", "", "0"),
            (f"{attn}.o_proj", "input"): one(f"{attn}.o_proj", "input", "0"),
            (f"{attn}.o_proj", "output"): one(f"{attn}.o_proj", "output", "0"),
            (f"{layer}.post_attention_layernorm", "input"): one(f"{layer}.post_attention_layernorm", "output", "1"),
            (f"{layer}.post_attention_layernorm", "output"): one(f"{layer}.post_attention_layernorm", "output", "0"),
            (mlp, "input"): one(mlp, "input", "0"),
            (mlp, "output"): one(mlp, "output", "", "0"),
            (f"{mlp}.down_proj", "input"): one(f"{mlp}.down_proj", "input", "0"),
            (f"{mlp}.down_proj", "output"): one(f"{mlp}.down_proj", "output", "0"),
            (layer, "output"): stream(n),
        })
        sources.update(fused_projections(layer, qkv, gate_up, sizes))
    sources["model.norm", "input"] = stream(layers - 1)
    sources["model.norm", "output"] = one("model.norm", "output", "0", "")
    sources["lm_head", "input"] = one("logits_processor", "input", "1", layout="logits")
    sources[LOGITS] = one("logits_processor", "output", layout="logits")
    return sources
