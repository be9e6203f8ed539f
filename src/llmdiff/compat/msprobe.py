"""msProbe's ``PrecisionDebugger`` on top of llmdiff: change the import, keep the script and config.json.

    from llmdiff.compat.msprobe import PrecisionDebugger, seed_all   # was: from msprobe.pytorch import ...

    debugger = PrecisionDebugger(config_path="./config.json")
    debugger.start(model=model)
    ...forward passes...
    debugger.stop()
    debugger.step()

config.json keys and what they become:

=====================  ========================================================================
``task``               ``statistics`` → llmdiff ``mode="stats"``; ``tensor`` → ``mode="tensor"``;
                       other tasks (overflow_check, free_benchmark, ...) are refused
``dump_path``          the llmdiff run folder (must be new or empty: nothing is overwritten)
``rank``               ``ranks``; ``[]`` = all
``step``               debugger steps to capture (``[0, 2, "4-6"]``); ``[]`` = all. A debugger step
                       may hold many forward passes (a whole ``generate``): each pass is one
                       llmdiff step, numbered on across debugger steps
``level``              ``L0`` → module hooks; ``L1`` → op-level capture (torch API calls, named inside
                       their module: ``model.layers.0.self_attn/softmax``); ``mix`` → both. API calls
                       outside any module (a ``generate`` loop's own) are not captured
``async_dump``         accepted; llmdiff always writes from a background thread
``<task>.scope``       ``[first, last]`` module calls (``Module.model.layers.0.LlamaDecoderLayer.forward.0``):
                       in each forward pass, everything from the start of ``first``'s call to the
                       end of ``last``'s (msProbe counts ``forward.<n>`` across passes; llmdiff
                       applies the window to every pass)
``<task>.list``        module names (``Module.<path>.<Class>.forward.<n>`` → that module, all calls;
                       any other string, e.g. an API name, → modules and ops whose name contains it)
``<task>.data_mode``   ``all``/``forward`` → inputs and outputs; ``input``; ``output``; ``backward``
                       is refused (llmdiff captures inference)
``summary_mode``       ``statistics``; ``md5`` → a content hash for bit-exactness checks (blake2b)
=====================  ========================================================================
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmdiff.capture.seed import seed_all as _seed_all
from llmdiff.capture.session import Capture, save
from llmdiff.config import load_config_file, make_config, parse_steps
from llmdiff.errors import UsageError

__all__ = ["PrecisionDebugger", "seed_all"]

_MODULE_CALL = re.compile(r"^(?:Module|Cell)\.(?P<path>.+)\.[^.]+\.(?:forward|backward)\.\d+$")
_KNOWN_KEYS = {"task", "dump_path", "rank", "step", "level", "async_dump", "seed", "is_deterministic",
               "enable_dataloader", "framework", "statistics", "tensor", "acl_config", "precision"}


def seed_all(seed: int = 1234, mode: bool = False, rm_dropout: bool = False) -> None:
    """msProbe's ``seed_all``: seed everything; ``mode=True`` asks for deterministic kernels.
    (``rm_dropout`` is accepted; inference in ``eval()`` mode has no dropout to remove.)"""
    _seed_all(seed, deterministic=mode)


def _steps(value: Any) -> str:
    if value in (None, [], ""):
        return "all"
    items = value if isinstance(value, list) else [value]
    try:
        return ",".join(str(int(v)) if not isinstance(v, str) else v.strip() for v in items)
    except (TypeError, ValueError):
        raise UsageError(f"msprobe config: step: expected a list of steps like [0, 2, '4-6'], got {value!r}") from None


def _name_regex(name: Any, option: str) -> str:
    """``Module.<path>.<Class>.forward.<n>`` → that module exactly; any other string → names containing it."""
    if not isinstance(name, str):
        raise UsageError(f"msprobe config: {option}: expected module names, got {name!r}")
    m = _MODULE_CALL.match(name)
    return f"^{re.escape(m['path'])}$" if m else re.escape(name)


def _scope(scope: list[Any]) -> list[str] | None:
    if not scope:
        return None
    if len(scope) != 2:
        raise UsageError(f"msprobe config: scope: expected [first, last] module calls, got {scope!r}")
    return [_name_regex(s, "scope") for s in scope]


class PrecisionDebugger:
    """msProbe's debugger, capturing with llmdiff. ``config_path`` is an msProbe config.json; ``task``,
    ``dump_path``, ``level`` and ``step`` override it, as in msProbe."""

    def __init__(self, config_path: str | os.PathLike[str] | None = None, task: str | None = None,
                 dump_path: str | os.PathLike[str] | None = None, level: str | None = None,
                 model: nn.Module | None = None, step: Iterable[int | str] | None = None) -> None:
        config = load_config_file(str(config_path), "msprobe config") if config_path is not None else {}
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise UsageError(f"msprobe config: unknown key(s) {', '.join(unknown)}")
        self.task = task or config.get("task", "statistics")
        if self.task not in ("statistics", "tensor"):
            raise UsageError(f"msprobe config: task {self.task!r} is not supported by llmdiff (statistics, tensor)")
        self.level = level or config.get("level", "L1")
        if self.level not in ("L0", "L1", "mix"):
            raise UsageError(f"msprobe config: level {self.level!r} is not one of L0, L1, mix")
        self.dump_path = Path(dump_path or config.get("dump_path") or "./dump_path")
        task_config = config.get(self.task) or {}
        if not isinstance(task_config, dict):
            raise UsageError(f"msprobe config: {self.task!r} must be an object")
        data_mode = task_config.get("data_mode", ["all"])
        data_mode = [data_mode] if isinstance(data_mode, str) else list(data_mode)
        if "backward" in data_mode:
            raise UsageError("msprobe config: data_mode 'backward': llmdiff captures forward passes only")
        wants_in = bool({"all", "forward", "input"} & set(data_mode))
        wants_out = bool({"all", "forward", "output"} & set(data_mode))
        if not (wants_in or wants_out):
            raise UsageError(f"msprobe config: data_mode {data_mode!r} selects nothing")
        summary_mode = task_config.get("summary_mode", "statistics")
        if summary_mode not in ("statistics", "md5"):
            raise UsageError(f"msprobe config: summary_mode {summary_mode!r} is not statistics or md5")
        self.debugger_steps = parse_steps(_steps(step if step is not None else config.get("step")), "step")
        self.config = make_config(  # validated now, before the model runs
            modules=[_name_regex(n, "list") for n in task_config.get("list") or []] or None,
            scope=_scope(list(task_config.get("scope") or [])),
            steps="all", mode="stats" if self.task == "statistics" else "tensor",
            parts="both" if wants_in and wants_out else "inputs" if wants_in else "outputs",
            ranks=config.get("rank") or None, hash=summary_mode == "md5",
            level={"L0": "module", "L1": "op", "mix": "mix"}[self.level])
        self.current_step = 0
        self.capture: Capture | None = None
        self._model = model

    def start(self, model: nn.Module | None = None) -> None:
        """Begin (or resume) capturing ``model`` if the current debugger step is selected."""
        model = model if model is not None else self._model
        if model is None:
            raise UsageError("PrecisionDebugger.start: llmdiff needs the model: start(model=...)")
        self._model = model
        if self.current_step not in self.debugger_steps:
            return
        if self.capture is None:
            self.capture = Capture(model, self.dump_path, self.config)
            atexit.register(self.capture.stop)
        self.capture.start()

    def stop(self) -> None:
        """Stop capturing (hooks removed); what was captured is on disk. ``start`` resumes."""
        if self.capture is not None:
            self.capture.pause()

    def step(self) -> None:
        """Move on to the next debugger step."""
        self.stop()
        self.current_step += 1

    def close(self) -> None:
        """Finish the run folder now (otherwise done at interpreter exit)."""
        if self.capture is not None:
            self.capture.stop()

    @staticmethod
    def save(variable: torch.Tensor, name: str, save_backward: bool = True) -> None:
        """Record one tensor under ``name`` while capturing (msProbe's ``save``); ``save_backward`` is ignored."""
        save(variable, name)
