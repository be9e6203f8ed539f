"""msIT's ``DumpConfig`` + ``register_hook`` on top of llmdiff: change the import, keep the script.

    from llmdiff.compat.msit import DumpConfig, register_hook, seed_all   # was: from msit_llm import ...

    register_hook(model, DumpConfig(dump_path="./dump", token_range=list(range(8))))

Differences from msIT, on purpose: a ``DumpConfig`` is a plain object (msIT's is a process-wide
singleton: a second ``DumpConfig(...)`` silently returns the first); every argument is validated
(a misspelt ``mode`` is an error, not a silent module dump); ``register_hook``
returns the :class:`~llmdiff.capture.session.Capture` so it can be stopped, and registering the
same model twice is an error rather than a silent no-op. The dump is written in llmdiff's format
into ``<dump_path>/llmdiff_dump_<time>/``, with keyword inputs and ``ModelOutput`` fields that msIT
drops.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import re
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from llmdiff.capture.seed import seed_all as _seed_all
from llmdiff.capture.session import Capture
from llmdiff.config import make_config
from llmdiff.errors import UsageError

__all__ = ["DumpConfig", "register_hook", "seed_all"]

_registered: weakref.WeakKeyDictionary[nn.Module, Capture] = weakref.WeakKeyDictionary()


def seed_all(seed: int = 2024) -> None:
    """msIT's ``seed_all``: seed everything and ask for deterministic kernels."""
    _seed_all(seed, deterministic=True)


def layer_name_regex(layer_name: str) -> str:
    """msIT's ``layer_name`` (``*`` = any characters, names start with ``root``) as a regex on llmdiff's
    module paths, which have no ``root.`` prefix (the model itself is ``""``)."""
    if layer_name == "root":
        return "^$"
    if layer_name.startswith("root."):
        layer_name = layer_name[5:]
    elif layer_name.startswith("root*"):
        layer_name = layer_name[4:]
    return "^" + ".*".join(re.escape(part) for part in layer_name.split("*")) + "$"


@dataclass
class DumpConfig:
    """What to dump, in msIT's words. ``token_range``: forward passes (0 = prefill); ``module_list``:
    module classes (subclasses count); ``tensor_part``: 0 inputs, 1 outputs, 2 both; ``device_id``:
    only that accelerator (CPU tensors always); ``dump_last_logits``: only the model's logits;
    ``mode``: ``"module"``, ``"api"`` (torch ops, named ``<module>/<op>``) or both; ``dump_weight``:
    also the parameters (of ``layer_name``'s modules when given); ``layer_name``: msIT glob like
    ``root.model.layers.0*``; ``seed``: seed everything first."""

    dump_path: str = "./"
    token_range: list[int] = field(default_factory=lambda: [0])
    module_list: list[type] = field(default_factory=list)
    tensor_part: int = 2
    device_id: int | None = None
    dump_last_logits: bool = False
    mode: str | list[str] = "module"
    dump_weight: bool = False
    layer_name: str | None = None
    seed: int | None = None
    stats_only: bool = False

    def __post_init__(self) -> None:
        modes = [self.mode] if isinstance(self.mode, str) else list(self.mode)
        bad = [m for m in modes if m not in ("module", "api")]
        if bad or not modes:
            raise UsageError(f"DumpConfig: mode must be 'module', 'api' or ['api', 'module'], got {self.mode!r}")
        if not isinstance(self.token_range, (list, tuple, range)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.token_range):
            raise UsageError(f"DumpConfig: token_range must be a list of token indices, got {self.token_range!r}")
        if not self.token_range:
            raise UsageError("DumpConfig: token_range is empty: nothing would be dumped")
        if self.tensor_part not in (0, 1, 2) or isinstance(self.tensor_part, bool):
            raise UsageError(f"DumpConfig: tensor_part must be 0 (inputs), 1 (outputs) or 2 (both), "
                             f"got {self.tensor_part!r}")
        if not isinstance(self.module_list, (list, tuple)) or not all(isinstance(c, type) for c in self.module_list):
            raise UsageError(f"DumpConfig: module_list must be a list of module classes, got {self.module_list!r}")
        if self.device_id is not None and (not isinstance(self.device_id, int) or isinstance(self.device_id, bool)):
            raise UsageError(f"DumpConfig: device_id must be an int, got {self.device_id!r}")
        if self.layer_name is not None and not isinstance(self.layer_name, str):
            raise UsageError(f"DumpConfig: layer_name must be a string like 'root.model.layers.0*', "
                             f"got {self.layer_name!r}")
        if self.seed is not None:
            seed_all(self.seed)

    def capture_options(self, model: nn.Module) -> dict[str, Any]:
        """The llmdiff capture options this config stands for."""
        if self.dump_last_logits:
            modules: list[str] | None = ["^$"]  # the model's own output: its logits
            parts = "outputs"
        else:
            modules = [layer_name_regex(self.layer_name)] if self.layer_name else None
            parts = ("inputs", "outputs", "both")[self.tensor_part]
        types = None
        if self.module_list:
            classes = tuple(self.module_list)
            types = sorted({type(m).__name__ for m in model.modules() if isinstance(m, classes)})
            if not types:
                raise UsageError(f"DumpConfig: no module of the model is a {', '.join(c.__name__ for c in classes)}")
        devices = None
        if self.device_id is not None:
            devices = ["cpu"] + [f"{kind}:{self.device_id}" for kind in ("cuda", "npu", "xpu", "mps")]
        modes = {self.mode} if isinstance(self.mode, str) else set(self.mode)
        level = "mix" if modes == {"api", "module"} else "op" if modes == {"api"} else "module"
        return {"modules": modules, "types": types, "steps": sorted(set(self.token_range)), "parts": parts,
                "mode": "stats" if self.stats_only else "tensor", "devices": devices, "level": level}


def register_hook(model: nn.Module, config: DumpConfig, hook_type: str = "dump_data") -> Capture:
    """Start dumping ``model`` as ``config`` says, for the rest of the process (or until ``.stop()`` on the
    returned capture). The run folder is ``<dump_path>/llmdiff_dump_<time>``; its path is printed."""
    if hook_type != "dump_data":
        raise UsageError(f"register_hook: hook_type {hook_type!r} is not supported (only 'dump_data')")
    if not isinstance(model, nn.Module):
        raise UsageError(f"register_hook: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, DumpConfig):
        raise UsageError(f"register_hook: config must be a DumpConfig, got {type(config).__name__}")
    previous = _registered.get(model)
    if previous is not None and previous.running:
        raise UsageError(f"register_hook: this model is already being dumped into {previous.run_dir}; "
                         "call .stop() on the capture register_hook returned first")
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    run_dir = Path(config.dump_path) / f"llmdiff_dump_{stamp}"
    capture = Capture(model, run_dir, make_config(**config.capture_options(model))).start()
    if config.dump_weight:
        pattern = re.compile(layer_name_regex(config.layer_name)) if config.layer_name else None
        capture.save_weights(model, None if pattern is None else lambda path, owner: bool(pattern.match(path)))
    _registered[model] = capture
    atexit.register(capture.stop)
    print(f"llmdiff: dumping into {run_dir}", file=sys.stderr)
    return capture
