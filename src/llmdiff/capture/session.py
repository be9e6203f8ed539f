"""A capture session: the only place where global state (hooks, the active run) goes in and out.

``Capture`` registers forward pre/post hooks on the modules it selects and removes exactly those on
``stop``. Hooks never return a value, so they cannot replace what a module receives or returns, and
every tensor is copied (or reduced to statistics) when its hook fires, so later in-place ops do not
change what was recorded.

A *step* is one call of the outermost hooked module (for ``generate``: step 0 is the prefill, step
k the k-th decode), unless the user marks steps with :meth:`Capture.step`. With ``model=None`` the
session finds models by itself: a global pre-hook attaches to every module called outside any other
(this is how ``llmdiff run`` works without code changes).
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmdiff.capture.flatten import flatten
from llmdiff.capture.ops import OpRecorder
from llmdiff.capture.staging import ROW_DTYPES, Arena, Rows
from llmdiff.capture.stats import GROUP_MAX, batch_stats, content_hashes, reduce_now
from llmdiff.config import (
    CaptureConfig,
    config_from_mapping,
    is_vllm_config,
    load_config_file,
    make_config,
    op_filter,
    vllm_config,
)
from llmdiff.engines import EngineSteps, engine_steps, resolve_model
from llmdiff.errors import LlmdiffError
from llmdiff.store.rundir import finish_run_dir, new_run_dir, now, prepare_run_dir, versions, write_json_atomic
from llmdiff.store.schema import FORMAT, FORMAT_VERSION, PROCESS_FILE, RUN_FILE, StepRecord, stats_unknown
from llmdiff.store.writer import DumpWriter, spare_cpu

_active: list[Capture] = []

#: Copies waiting for their statistics are reduced, read back and handed to the writer at the latest at this
#: many bytes (and at each step's end); statistics-only copies live in reusable memory of this size.
FLUSH_BYTES = 64 << 20
# Tensor classes whose small copies may be rows of a plain matrix (a subclass, a DTensor say, is cloned as itself)
_PLAIN = (torch.Tensor, nn.Parameter)


_PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]
_PostHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]


class LlmdiffWarning(UserWarning):
    """Something the user should know about a capture that is not an error (e.g. hooks never fired)."""


def active_capture() -> Capture | None:
    """The innermost started capture of this process, if any."""
    return _active[-1] if _active else None


def _distributed_rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else None


class Capture:
    """Capture intermediate tensors of ``model`` (or of every model, with ``model=None``) into ``run_dir``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. See :func:`llmdiff.capture`.
    """

    def __init__(self, model: Any, run_dir: str | os.PathLike[str], config: CaptureConfig | None = None,
                 *, auto_step: bool = True, owns_run_dir: bool = True, weights: bool = False) -> None:
        self.model, self._engine_hint = resolve_model(model)
        self.run_dir = Path(run_dir)
        self.config = config or make_config()
        self.auto_step = auto_step
        self.owns_run_dir = owns_run_dir
        self.weights = weights
        self.folder: Path | None = None
        self.rank: int | None = None
        self.current_step = 0
        self.steps_done = 0
        self.calls_seen = 0
        self._started = False
        self._paused = False
        self._in_scope = False
        self._handles: list[RemovableHandle] = []
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        # id(module) -> its hooks (the hooks keep the modules attached)
        self._hooks: dict[int, tuple[_PreHook, _PostHook]] = {}
        self._models: list[dict[str, str]] = []
        self._model_index: dict[int, int] = {}
        self._writer: DumpWriter | None = None
        self._start_time = ""
        self._calls: dict[str, int] = {}
        # id(tensor) -> the tensor recorded this step, its version then and its entry (see _Seen)
        self._seen: dict[int, _Seen] = {}
        self._forget = _forgetter(self._seen)
        self._token_ids: list[Any] | None = None
        self._step_first_seq = 0  # the seq of this step's first entry
        self._depth = 0
        # the open module calls, innermost last: (module, its path, call index, caller)
        self._frames: list[tuple[nn.Module, str, int, str | None]] = []
        self._kwargs_pending: set[int] = set()
        self._seq = 0  # the next entry's seq: entries recorded so far
        self._graph_capture_seen = False
        self._selected_key: tuple[Any, ...] | None = None  # what _step_selected's cached answer holds for
        self._selected_now = False
        self._pending: list[tuple[Any, ...]] = []  # recorded this step, not yet flushed: see _record
        # the pending entries' copies, by the index their tuple holds (None: a row of _rows)
        self._copies: list[torch.Tensor | None] = []
        # by index in _copies: the statistics row, element count and version of a large tensor reduced when its hook
        # fired; its item in _copies is the model's own tensor, looked at again only if the row shows NaN/Inf
        self._reduced: dict[int, tuple[torch.Tensor, int, int]] = {}
        self._pending_bytes = 0
        self._staging = Arena(FLUSH_BYTES)
        self._rows = Rows()
        self._pinned_calls = any(p.call is not None for p in self.config.modules)
        self._scoped = self.config.scope is not None
        self._inputs = "input" in self.config.parts
        self._devices = bool(self.config.devices)
        self._admitted: set[_Place] = set()  # places _record takes without asking _admit
        self._keep = self.config.mode == "tensor"  # full tensors are stored (unless larger than _max_size)
        self._reduce_at_hook = not self.config.hash  # a hash needs the bytes as they were: a copy
        self._max_size = self.config.max_tensor_size
        self._outputs = "output" in self.config.parts
        self._busy = False  # the capture's own torch calls are not ops of the model
        self._weights_saved = False
        self._op_mode: OpRecorder | None = None
        self._ops_wanted = op_filter(self.config) if self.config.level != "module" else None
        self._engine: EngineSteps | None = None  # an engine that marks its own steps (vLLM)
        self._engine_step_open = False
        self.warmup_calls = 0  # outermost calls of an engine's model outside its steps (warm-up, profiling)
        self.internal_errors = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Capture:
        """Register the hooks. Creates the run folder (which must be new or empty) when this session owns it;
        after :meth:`pause`, registers the hooks again and goes on writing into the same run."""
        if self._started:
            return self
        if self._paused:
            self._paused = False
        else:
            if self.owns_run_dir and not self._joins_distributed_run():
                prepare_run_dir(self.run_dir, list(sys.argv), self.config.to_json())
            self._start_time = now()
        if self.model is not None:
            if hasattr(self.model, "_orig_mod"):
                warnings.warn("llmdiff: this model is wrapped by torch.compile; module hooks do not fire inside "
                              "compiled code. Capture the eager model (model._orig_mod) instead.",
                              LlmdiffWarning, stacklevel=3)
            self._attach(self.model)
        else:
            self._handles.append(nn.modules.module.register_module_forward_pre_hook(self._discover))
        if self.weights and self.model is not None and not self._weights_saved:
            self._weights_saved = True
            config = self.config
            self.save_weights(self.model, lambda path, owner: config.selects_module(path, type(owner).__name__))
        if self._ops_wanted is not None:
            # The step test first thing: in a step that records nothing (steps="0" of a generate) an op then
            # costs the mode's dispatch and this call, not the naming and counting of a recorded one.
            self._op_mode = OpRecorder(
                self._ops_wanted, lambda: self._depth > 0 and not self._busy and self._step_selected(),
                self._record_op)
            self._op_mode.__enter__()
        self._started = True
        _active.append(self)
        return self

    def pause(self) -> None:
        """Remove the hooks but keep the run open: :meth:`start` resumes, :meth:`stop` finishes.

        Steps are counted on: the next forward pass after a resume is a new step.
        """
        if not self._started:
            return
        self._detach()
        self._paused = True
        if not self.auto_step and self._step_entries:
            self._end_step()
        self._flush()

    def _detach(self) -> None:
        if self._engine is not None:
            self._engine.detach()
            self._engine = None
        if self._op_mode is not None:
            self._op_mode.__exit__(None, None, None)
            self._op_mode = None
        self._started = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._names = weakref.WeakKeyDictionary()
        self._hooks = {}
        if self in _active:
            _active.remove(self)

    def stop(self) -> None:
        """Remove every hook this session added, finish the open step (manual stepping) and drain the writer."""
        if not self._started and not self._paused:
            return
        self._detach()
        self._paused = False
        if not self.auto_step and self._step_entries:
            self._end_step()
        try:
            self._flush()  # entries of a step cut short stay readable as unfinished
            self._staging.release()
            self._rows.release()
            if self._writer is not None:
                self._writer.close()
        finally:
            if self.folder is not None:
                self._write_process_file(end=now())
            if self.owns_run_dir and self.run_dir.joinpath(RUN_FILE).exists() and self.rank in (None, 0):
                finish_run_dir(self.run_dir)
        # In zero-code capture most processes (an engine's front end, its scheduler) run no model at all.
        if self.calls_seen == 0 and self.entries == 0 and self.model is not None:
            warnings.warn("llmdiff: no forward call of a captured module was seen. If the model ran under "
                          "torch.compile or CUDA graphs, hooks do not fire there: run it eagerly to capture.",
                          LlmdiffWarning, stacklevel=2)
        if self._graph_capture_seen:
            warnings.warn("llmdiff: tensors produced during CUDA graph capture were skipped; replays are not "
                          "visible to hooks. Run eagerly (e.g. --enforce-eager) to capture them.",
                          LlmdiffWarning, stacklevel=2)

    def step(self) -> None:
        """End the current step and start the next. Calling it switches this session to manual stepping."""
        self.auto_step = False
        self._end_step()

    def save(self, tensor: torch.Tensor, name: str) -> None:
        """Record one tensor under ``name`` in the current step (like msProbe's ``save``)."""
        if not isinstance(tensor, torch.Tensor):
            raise LlmdiffError(f"save({name!r}): expected a tensor, got {type(tensor).__name__}")
        if not self._step_selected():
            return
        call = self._calls[name] = self._calls.get(name, -1) + 1
        busy, self._busy = self._busy, True
        try:
            self._record(name, "save", call, "save", "", tensor)
        finally:
            self._busy = busy

    def save_weights(self, model: nn.Module, module_filter: Callable[[str, nn.Module], bool] | None = None) -> int:
        """Record ``model``'s parameters (and buffers) as part ``param`` of their modules, in the current
        step, whatever the step filter says; returns how many were recorded. ``module_filter`` gets the
        path and the module owning each (``"model.layers.0.mlp.up_proj"``, the ``Linear``)."""
        count = 0
        for full_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            module, _, leaf = full_name.rpartition(".")
            owner = model.get_submodule(module) if module else model
            if module_filter is not None and not module_filter(module, owner):
                continue
            self._record(module, type(owner).__name__, 0, "param", leaf, tensor.detach())
            count += 1
        if count and self.auto_step and self._depth == 0:
            self._flush()
        return count

    @property
    def entries(self) -> int:
        """Entries recorded so far."""
        return self._seq

    @property
    def _step_entries(self) -> int:
        return self._seq - self._step_first_seq

    @property
    def running(self) -> bool:
        """Whether the hooks are in place (started, not paused or stopped)."""
        return self._started

    @property
    def bytes_written(self) -> int:
        return 0 if self._writer is None else self._writer.bytes_written

    # -- hooks --------------------------------------------------------------------------------------
    def _attach(self, root: nn.Module) -> None:
        cfg = self.config
        param = next(root.parameters(), None)
        claimed = engine_steps(self, root, self._engine_hint) if self._engine is None and self.auto_step else None
        if claimed is not None:
            self._engine = claimed
        if self._model_index.get(id(root)) is None:
            self._model_index[id(root)] = len(self._models)
            info: dict[str, Any] = {
                "class": type(root).__name__,
                "dtype": _dtype_name(param.dtype) if param is not None else "",
                "device": str(param.device) if param is not None else "",
            }
            if claimed is not None:
                info["engine"] = claimed.describe()
            self._models.append(info)
        callers = _callers_of_shared(root, cfg)
        for name, module in root.named_modules():
            if module in self._names:
                continue
            self._names[module] = name
            # Op-level capture names an op by the module running it, so it hooks every module; the callers
            # of a selected shared module are hooked too (not recorded) so that its calls can name them.
            if (module is root or cfg.level != "module" or name in callers
                    or cfg.selects_module(name, type(module).__name__)):
                pre, post = self._hooks[id(module)] = self._module_hooks(module, name)
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _discover(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Global pre-hook (model=None): the first outermost call of a module attaches its whole tree.
        # Its own new hooks fire from the next call on, so this call's entry is handled here; its
        # keyword arguments are not visible to a global pre-hook and are recorded at exit instead.
        if self._depth == 0 and module not in self._names:
            try:
                self._attach(module)
            except Exception as exc:
                self._internal_error(exc)
                return
            self._kwargs_pending.add(id(module))
            hooks = self._hooks.get(id(module))
            if hooks is not None:
                hooks[0](module, args, {})

    def _internal_error(self, exc: Exception) -> None:
        # A capture never crashes the program it observes: an error of llmdiff's own is reported once,
        # counted in process.json, and the rest of the run goes on (capturing what it still can).
        self.internal_errors += 1
        if self.internal_errors == 1:
            warnings.warn(f"llmdiff: capture error (the program goes on): {type(exc).__name__}: {exc}",
                          LlmdiffWarning, stacklevel=2)

    def _module_hooks(self, module: nn.Module, name: str) -> tuple[_PreHook, _PostHook]:
        """The pre- and post-hook of one module. They run at every call of every hooked module, so what they
        need (its path, type, parent, whether the filters select it) is bound here, once, and their bodies
        are kept to plain reads: a decode step of a small model is a few hundred calls of a few microseconds."""
        session = self
        type_name = type(module).__name__
        parent = name.rpartition(".")[0]
        wanted = self.config.level != "op" and self.config.selects_module(name, type_name)

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            try:
                session.calls_seen += 1
                if session._depth == 0:
                    session._outermost_call(module, args, kwargs)
                session._depth += 1
                calls = session._calls
                call = calls[name] = calls.get(name, -1) + 1
                # A module shared by several callers (vLLM's one rotary_emb for every layer) records who called it.
                frames = session._frames
                caller = frames[-1][1] if frames else None
                if caller is not None and (caller == parent or not caller or name.startswith(caller + ".")):
                    caller = None  # called by an ancestor: nothing to say
                frames.append((module, name, call, caller))
                if session._scoped and not session._in_scope:
                    first = session.config.scope[0]  # type: ignore[index]
                    session._in_scope = first.matches(name) and first.call in (None, call)
                if wanted and session._inputs and session._call_selected(name, call):
                    if args:
                        session._record_value(name, type_name, call, "input", args, caller)
                    if kwargs:
                        session._record_value(name, type_name, call, "kwarg", kwargs, caller)
            except Exception as exc:
                session._internal_error(exc)

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            try:
                frames = session._frames
                if not frames or frames[-1][0] is not module:  # hooks attached while this call was running
                    return
                call, caller = frames.pop()[2:]
                session._depth -= 1
                if session._kwargs_pending and id(module) in session._kwargs_pending:
                    session._kwargs_pending.discard(id(module))
                    if session._depth == 0 and session.auto_step and session._token_ids is None:
                        session._token_ids = _token_ids(args, kwargs)
                    if wanted and session._inputs and kwargs and session._call_selected(name, call):
                        session._record_value(name, type_name, call, "kwarg", kwargs, caller)
                if wanted and session._outputs and session._call_selected(name, call):
                    session._record_value(name, type_name, call, "output", output, caller)
                if session._scoped and session._in_scope:
                    last = session.config.scope[1]  # type: ignore[index]
                    session._in_scope = not (last.matches(name) and last.call in (None, call))
                if session._depth == 0 and session.auto_step and session._engine is None:
                    session._end_step()
            except Exception as exc:
                session._internal_error(exc)

        if self._ops_wanted is None:
            return pre, post

        # With op-level capture on, the hooks' own tensor calls are not the model's ops.
        def pre_without_ops(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            with torch._C.DisableTorchFunction():
                pre(module, args, kwargs)

        def post_without_ops(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            with torch._C.DisableTorchFunction():
                post(module, args, kwargs, output)

        return pre_without_ops, post_without_ops

    def _outermost_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A call outside any other: an engine's forward pass (a step or a warm-up), or the start of a step.
        if self._engine is not None:
            self._engine.root_call(module, args, kwargs)
            self.warmup_calls += not self._engine_step_open
        elif self.auto_step:
            self._begin_step(args, kwargs)

    def _call_selected(self, name: str, call: int) -> bool:
        """Whether this call of a selected module is recorded (step, scope, ``:i`` call index)."""
        if not self._step_selected() or (self._scoped and not self._in_scope):
            return False
        return not self._pinned_calls or self.config.selects_call(name, call)

    # -- ops ------------------------------------------------------------------------------------------
    def _record_op(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._busy = True
        try:
            self._record_op_call(name, args, kwargs, output)
        except Exception as exc:
            self._internal_error(exc)
        finally:
            self._busy = False

    def _record_op_call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        cfg = self.config
        full = f"{self._frames[-1][1] if self._frames else ''}/{name}"
        call = self._calls[full] = self._calls.get(full, -1) + 1
        if self._scoped and not self._in_scope:  # the step was tested by the op mode's active()
            return
        if cfg.modules and not cfg.selects_call(full, call):
            return
        record = self._record
        if self._inputs:
            for part, value in (("input", args), ("kwarg", kwargs)):
                if not value:
                    continue
                for path, tensor in flatten(value):
                    # Weights reach ops as inputs (F.linear's weight) at every call; they do not change
                    # within a run, so they are left out here (weights=True records them once). A plain
                    # Tensor is not one: nn.Parameter's isinstance is a Python-level check, asked per op input.
                    if type(tensor) is torch.Tensor or not isinstance(tensor, nn.Parameter):
                        record(full, "op", call, part, path, tensor)
        if self._outputs:
            if isinstance(output, torch.Tensor):
                record(full, "op", call, "output", "", output)
            else:
                for path, tensor in flatten(output):
                    record(full, "op", call, "output", path, tensor)

    def _step_selected(self) -> bool:
        # Asked at every module call; what it depends on changes only between steps.
        key = (self.current_step, self._engine is None, self._engine_step_open, self.rank)
        if key != self._selected_key:
            self._selected_key = key
            self._selected_now = self._step_selected_now()
        return self._selected_now

    def _step_selected_now(self) -> bool:
        if self._engine is not None and not self._engine_step_open:
            return False  # an engine's warm-up pass, or between its steps
        ranks = self.config.ranks
        return self.current_step in self.config.steps and (ranks is None or self._rank() in ranks)

    # -- steps ----------------------------------------------------------------------------------------
    def _reset_step_state(self) -> None:
        self._in_scope = False
        self._frames = []
        self._calls = {}
        self._seen.clear()  # the same dict: the weak references' callbacks hold it
        self._token_ids = None
        self._step_first_seq = self._seq

    def _begin_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._reset_step_state()
        self._token_ids = _token_ids(args, kwargs)

    def _end_step(self, metadata: Mapping[str, Any] | None = None) -> None:
        self._flush()
        if self._step_selected() and (self._step_entries or self._writer is not None):
            metadata = metadata or {}
            # An engine's worker can be killed as soon as it answers (vLLM's shutdown does): its steps are
            # made durable before the engine goes on.
            self._ensure_writer().end_step(StepRecord(
                self._rank(), self.current_step, metadata.get("token_ids", self._token_ids), self._step_entries,
                requests=metadata.get("requests"), positions=metadata.get("positions"),
                note=metadata.get("requests_note")), wait=self._engine is not None)
            self.steps_done += 1
        self.current_step += 1
        self._reset_step_state()

    # -- steps marked by an engine (llmdiff.engines) -------------------------------------------------
    def engine_step_begin(self) -> None:
        """An engine step starts: module calls from here on belong to step ``current_step``."""
        self._reset_step_state()
        self._engine_step_open = True

    def engine_step_end(self, metadata: Mapping[str, Any] | None) -> None:
        """The engine step is over; ``metadata`` (token ids, positions, requests) goes into its step line."""
        try:
            self._end_step(metadata)
        finally:
            self._engine_step_open = False

    def engine_step_discard(self) -> None:
        """The engine's step ran no forward pass: it is not a step."""
        self._engine_step_open = False
        self._reset_step_state()

    def engine_steps_unavailable(self) -> None:
        """The engine cannot mark steps for this model: fall back to one step per outermost call."""
        if self._engine is not None:
            self._engine.detach()
        self._engine = None

    # -- recording --------------------------------------------------------------------------------------
    def _record_value(self, module: str, type_name: str, call: int, part: str, value: Any,
                      caller: str | None) -> None:
        if isinstance(value, torch.Tensor):
            self._record(module, type_name, call, part, "", value, caller)
        elif type(value) is tuple and len(value) == 1 and isinstance(value[0], torch.Tensor):
            self._record(module, type_name, call, part, "0", value[0], caller)  # most inputs: (hidden_states,)
        else:
            for path, tensor in flatten(value):
                self._record(module, type_name, call, part, path, tensor, caller)

    def _record(self, module: str, type_name: str, call: int, part: str, path: str, tensor: torch.Tensor,
                caller: str | None = None) -> None:
        # Runs for every captured tensor (tens of thousands a run): plain attribute reads and at most one copy.
        # What is held until the flush is one tuple of plain values per entry (store.writer.PendingEntry), which
        # Python's collector stops tracking.
        device = tensor.device
        place = _PLACES.get(device) or _place(device)
        if place not in self._admitted and not self._admit(place):
            return
        seq = self._seq
        self._seq = seq + 1
        dtype = tensor.dtype
        shape = tensor.shape
        note = None
        index = same_as = -1
        keep = False
        if place.meta or tensor.layout is not torch.strided:
            note = f"not recorded: {tensor.layout} tensor on {place.name}"
        else:
            # The same tensor, unchanged, is stored once. Inference-mode tensors (vLLM) have no version counter,
            # so nothing tells whether they changed in place (vLLM's fused add+norm does): each is copied.
            if not tensor.is_inference():
                key, version = id(tensor), tensor._version
                seen = self._seen.get(key)
                if seen is not None and seen.version == version and seen() is tensor:
                    same_as = seen.seq
                else:
                    ref = self._seen[key] = _Seen(tensor, self._forget)
                    ref.key, ref.version, ref.seq = key, version, seq
            if same_as < 0:
                # What the model does next cannot change what was recorded: the tensor is copied (or reduced) now.
                numel = tensor.numel()
                keep = self._keep
                if keep and self._max_size is not None and numel > self._max_size:
                    note = f"stats only: {numel} elements > max_tensor_size {self._max_size}"
                    keep = False
                if not keep and 0 < numel <= GROUP_MAX and dtype in ROW_DTYPES and type(tensor) in _PLAIN:
                    # the common case, inline: a statistics-only copy of a small tensor is a row of a shared
                    # matrix, reduced with the others at the flush
                    index = len(self._copies)
                    self._rows.copy(tensor.detach() if tensor.requires_grad else tensor, index, (device, dtype, shape))
                    self._copies.append(None)
                    self._pending_bytes += numel * tensor.element_size()
                else:
                    index = self._copy(tensor, numel, keep)
        self._pending.append((seq, self.current_step, module, type_name, call, part, path, tuple(shape),
                              _DTYPE_NAMES.get(dtype) or _dtype_name(dtype), place.name, note, caller, index,
                              same_as, keep))
        if self._pending_bytes >= FLUSH_BYTES:
            self._flush()

    def _admit(self, place: _Place) -> bool:
        """Whether an entry on ``place`` is recorded now. A place whose answer cannot change until the writer
        does is remembered in ``_admitted``, so that ``_record`` asks once (an accelerator's is asked each time:
        a CUDA graph being captured records nothing)."""
        if self._devices and not self.config.selects_device(place.name):
            return False
        if place.cuda and torch.cuda.is_current_stream_capturing():
            self._graph_capture_seen = True
            return False
        if self._writer is None:
            self._ensure_writer()  # claims the process folder, which fixes this process's rank for every entry
        if not place.cuda:
            self._admitted.add(place)
        return True

    def _copy(self, tensor: torch.Tensor, numel: int, keep: bool) -> int:
        """Copy ``tensor`` (one ``_record`` does not make a row of) for the pending entries, stored if ``keep``:
        its index in the copies."""
        # A large tensor only reduced to statistics is reduced now (its version counter tells at the flush whether
        # it is still what was reduced, should NaN/Inf need counting); inference tensors have no version counter
        # and are copied into reusable memory. A copy that is stored gets its own.
        copy = None
        if not keep and numel > GROUP_MAX and self._reduce_at_hook and not tensor.is_inference():
            self._reduced[len(self._copies)] = (*reduce_now(tensor), tensor._version)
            copy = tensor
        elif not keep and numel > GROUP_MAX:
            copy = self._staging.copy(tensor)
            if copy is None and self._pending:
                self._flush()  # the staging memory is full: read back what it holds, then reuse it
                copy = self._staging.copy(tensor)
        if copy is None:
            copy = (tensor.detach() if tensor.requires_grad else tensor).clone()
        self._copies.append(copy)
        self._pending_bytes += numel * copy.element_size()
        return len(self._copies) - 1

    def _flush(self) -> None:
        """Compute the pending entries' statistics (one read-back per device) and hand them to the writer."""
        if not self._pending:
            return
        pending, copies, reduced = self._pending, self._copies, self._reduced
        self._pending, self._copies, self._reduced, self._pending_bytes = [], [], {}, 0
        pending, stats = self._statistics(pending, copies, self._rows.stacked(), reduced)
        self._staging.reset()
        self._rows.reset()
        self._ensure_writer().add(self.rank or 0, pending, copies, stats)

    def _statistics(self, pending: list[tuple[Any, ...]], copies: list[torch.Tensor | None],
                    stacked: list[tuple[torch.Tensor, list[int]]], reduced: dict[int, tuple[torch.Tensor, int, int]]
                    ) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
        """The statistics of the pending entries' copies (None: a row of a ``stacked`` matrix), and the entries
        with a note where they are unknown."""
        rows = {i: (row, numel) for i, (row, numel, _) in reduced.items()}
        gone = {i for i, (_, _, version) in reduced.items() if copies[i]._version != version}  # type: ignore[union-attr]
        devices = {copy.device for copy in copies if copy is not None} | {matrix.device for matrix, _ in stacked}
        if len(devices) <= 1:
            stats = batch_stats(copies, rows, gone, stacked)
        else:
            stats = [{}] * len(copies)
            for device in devices:
                own = [(matrix, owners) for matrix, owners in stacked if matrix.device == device]
                indices = sorted([i for i, copy in enumerate(copies) if copy is not None and copy.device == device]
                                 + [i for _, owners in own for i in owners])
                local = {i: k for k, i in enumerate(indices)}
                for i, row in zip(indices, batch_stats(
                        [copies[i] for i in indices], {local[i]: rows[i] for i in indices if i in rows},
                        {local[i] for i in indices if i in gone},
                        [(matrix, [local[i] for i in owners]) for matrix, owners in own]), strict=True):
                    stats[i] = row
        if gone and any(stats_unknown(stats[i]) for i in gone):
            pending = [_noted_unknown(entry) if entry[12] in gone and stats_unknown(stats[entry[12]]) else entry
                       for entry in pending]
        if self.config.hash:
            tensors = list(copies)
            for matrix, owners in stacked:
                for i, view in zip(owners, matrix.unbind(0), strict=True):
                    tensors[i] = view
            for row, digest in zip(stats, content_hashes(tensors), strict=True):  # type: ignore[arg-type]
                row["hash"] = digest
        return pending, stats

    # -- the process folder ------------------------------------------------------------------------------
    def _rank(self) -> int:
        if self.rank is None:
            dist_rank = _distributed_rank()
            return 0 if dist_rank is None else dist_rank
        return self.rank

    def _joins_distributed_run(self) -> bool:
        return _distributed_rank() is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1

    def _ensure_writer(self) -> DumpWriter:
        if self._writer is None:
            self.folder, self.rank = _claim_process_folder(self.run_dir)
            self._write_process_file(end=None)
            # A model on an accelerator leaves the host's cores to the writer; on CPU only spare cores do.
            on_device = any(info["device"] not in ("", "cpu") for info in self._models)
            self._writer = DumpWriter(self.folder, background=on_device or spare_cpu())
        return self._writer

    def _write_process_file(self, end: str | None) -> None:
        assert self.folder is not None
        write_json_atomic(self.folder / PROCESS_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "rank": self.rank, "pid": os.getpid(),
            "host": platform.node(), "argv": list(sys.argv), "models": self._models, "versions": versions(),
            "config": self.config.to_json(), "start": self._start_time, "end": end,
            "steps": self.steps_done, "entries": self.entries,
            "warmup_calls": self.warmup_calls, "internal_errors": self.internal_errors,
        })

    def _after_fork(self) -> None:
        # A forked child shares nothing with the parent's writer thread: it starts its own folder.
        self._writer = None
        self._admitted = set()
        self._pending, self._copies, self._reduced, self._pending_bytes = [], [], {}, 0
        self.folder = self.rank = None
        self._seq = self._step_first_seq = self.steps_done = 0
        self._depth = 0
        self._frames = []


def _noted_unknown(entry: tuple[Any, ...]) -> tuple[Any, ...]:
    note = ("statistics unknown: NaN/Inf (or a sum overflowing) present, and the model changed the tensor in place "
            "before they were counted")
    return (*entry[:10], note, *entry[11:])


def _callers_of_shared(root: nn.Module, config: CaptureConfig) -> set[str]:
    """The parent paths of every alias of a selected module that sits at several paths (vLLM's rotary_emb)."""
    if config.level != "module" or not (config.modules or config.types):
        return set()  # every module is hooked anyway
    aliases: dict[int, list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    callers: set[str] = set()
    for path, module in root.named_modules():
        paths = aliases.get(id(module), [])
        if len(paths) > 1 and config.selects_module(path, type(module).__name__):
            callers.update(alias.rpartition(".")[0] for alias in paths)
    return callers


def _claim_process_folder(run_dir: Path) -> tuple[Path, int]:
    """Create this process's folder: ``rankN`` under torch.distributed, else the first free ``procN``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = _distributed_rank()
    if rank is not None:
        folder = run_dir / f"rank{rank}"
        try:
            folder.mkdir()
        except FileExistsError:
            raise LlmdiffError(f"{folder} already exists: two processes claim rank {rank}") from None
        return folder, rank
    index = 0
    while True:  # mkdir is atomic, so concurrent processes each get their own folder
        folder = run_dir / f"proc{index}"
        try:
            folder.mkdir()
            return folder, index
        except FileExistsError:
            index += 1


class _Seen(weakref.ref):
    """A tensor recorded this step: a weak reference to it (ids are reused), its version then and its entry's seq.

    It removes itself from the step's table when the tensor is freed, so that it dies young: kept to the step's
    end, thousands of these a step were carried by Python's collector into its oldest generation, whose full
    collections walk the whole heap."""

    __slots__ = ("key", "seq", "version")
    key: int
    version: int
    seq: int


def _forgetter(seen: dict[int, _Seen]) -> Callable[[_Seen], None]:
    def forget(ref: _Seen) -> None:  # runs wherever the tensor is freed: must not raise
        if seen.get(ref.key) is ref:
            seen.pop(ref.key, None)
    return forget


class _Place:
    """A device as the hooks need it; one per device (``_PLACES``), so compared and hashed by identity."""

    __slots__ = ("cuda", "meta", "name")

    def __init__(self, device: torch.device) -> None:
        self.name = str(device)  # as written in the manifest: "cpu", "cuda:0"
        self.cuda = device.type == "cuda"
        self.meta = device.type == "meta"


_DTYPE_NAMES: dict[torch.dtype, str] = {}
_PLACES: dict[torch.device, _Place] = {}


def _place(device: torch.device) -> _Place:
    place = _PLACES[device] = _Place(device)
    return place


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _token_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel() <= 1 << 20:
        return ids.detach().cpu().tolist()
    return None


def _reset_all_after_fork() -> None:
    for session in _active:
        session._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_after_fork)


def capture(model: nn.Module | None, run_dir: str | os.PathLike[str] | None = None, *,
            config: CaptureConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
            modules: str | Iterable[str] | None = None, types: str | Iterable[str] | None = None,
            steps: str | int | Iterable[int] | None = "0", parts: str = "both", mode: str = "tensor",
            devices: str | Iterable[str] | None = None, ranks: str | int | Iterable[int] | None = None,
            max_tensor_size: int | None = None, hash: bool = False, level: str = "module",
            ops_file: str | os.PathLike[str] | None = None, ops_allow: Iterable[str] | None = None,
            ops_deny: Iterable[str] | None = None, weights: bool = False, auto_step: bool = True) -> Capture:
    """Capture intermediate tensors of ``model`` into the new folder ``run_dir``.

    Filters (see :mod:`llmdiff.config`): ``modules`` regexes with optional ``:i`` call index,
    ``types`` class names, ``steps`` like ``"0,2,5-7"`` or ``"all"``, ``parts`` inputs|outputs|both,
    ``devices``, ``ranks``, ``max_tensor_size`` (larger tensors keep statistics only). ``mode`` is
    ``"tensor"`` (full tensors and statistics) or ``"stats"``; ``hash=True`` adds a content hash.
    ``level`` is ``"module"``, ``"op"`` (the torch ops run inside modules, named ``<module>/<op>``,
    chosen by ``ops_file``/``ops_allow``/``ops_deny``) or ``"mix"`` (both). ``weights=True`` also
    records the parameters of the captured modules once, at the start (part ``param``).
    ``model=None`` captures every model the process runs.

    ``config`` replaces all the filters: a :class:`~llmdiff.config.CaptureConfig`, a dict of these
    options, a vLLM ``--intermediate-log-config`` dict, or a JSON file of either. Without ``run_dir``,
    a vLLM config's ``output_dir/<random id>`` is used, else a new ``llmdiff-runs/<time>``.

    >>> with llmdiff.capture(model, "runs/fp32", modules=[r"layers\\.0\\."], steps="0-3") as run:
    ...     model.generate(**inputs)
    """
    default_dir: Path | None = None
    if config is None:
        config = make_config(modules=modules, types=types, steps=steps, parts=parts, mode=mode, devices=devices,
                             ranks=ranks, max_tensor_size=max_tensor_size, hash=hash, level=level,
                             ops_file=None if ops_file is None else str(ops_file), ops_allow=ops_allow,
                             ops_deny=ops_deny)
    elif not isinstance(config, CaptureConfig):
        source = "config"
        if isinstance(config, (str, os.PathLike)):
            source, config = str(config), load_config_file(str(config))
        if is_vllm_config(config):
            vllm = vllm_config(config, source)
            config, default_dir = vllm.capture, vllm.new_run_dir()
        else:
            config = config_from_mapping(config, source)
    if run_dir is None:
        run_dir = default_dir or new_run_dir()
    return Capture(model, run_dir, config, auto_step=auto_step, weights=weights)


def save(tensor: torch.Tensor, name: str) -> None:
    """Record ``tensor`` under ``name`` into the active capture; does nothing when none is active."""
    session = active_capture()
    if session is not None:
        session.save(tensor, name)
