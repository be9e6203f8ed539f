"""The filter grammar shared by the Python API, the CLI and config files.

Every way of asking for a capture ends in one :class:`CaptureConfig`. Values are validated here,
before the user's program starts, and bad ones raise :class:`UsageError` naming the option.

Grammar
-------
``modules``  regexes searched in the full module path (``model.layers.0.mlp``). A trailing ``:i``
             keeps only the i-th call of that module within a step (inputs and outputs of that call).
             A ``:`` elsewhere stays part of the regex (``(?:q|k)_proj`` works).
``types``    module class names (``LlamaDecoderLayer``); an entry must match both lists when both are set.
``scope``    ``[first, last]``: two module regexes; in each step, capture from the call of ``first`` to the
             end of the call of ``last`` (execution order; msProbe's ``scope``), combined with the rest.
``steps``    ``"all"``, ``"0"``, ``"0-3"``, ``"0,2,5-7"``.
``parts``    ``"inputs"``, ``"outputs"`` or ``"both"``; keyword arguments count as inputs.
``mode``     ``"tensor"`` (full tensors plus statistics) or ``"stats"`` (statistics only).
``level``    ``"module"`` (module inputs/outputs), ``"op"`` (the torch ops run inside modules, named
             ``<module>/<op>``; ``modules`` regexes apply to that name) or ``"mix"`` (both).
``ops_file`` a YAML file of ``allow``/``deny`` op-name lists (default: llmdiff's ``capture/ops.yaml``);
             ``ops_allow``/``ops_deny`` add names to them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from llmdiff.errors import UsageError

MODES = ("tensor", "stats")
LEVELS = ("module", "op", "mix")
PARTS = {"inputs": frozenset({"input"}), "outputs": frozenset({"output"}), "both": frozenset({"input", "output"})}
_CALL_SUFFIX = re.compile(r"^(?P<regex>.*):(?P<call>\d+)$")


@dataclass(frozen=True)
class ModulePattern:
    """One ``modules`` item: a regex searched in the module path, optionally pinned to one call index."""

    regex: re.Pattern[str]
    call: int | None = None

    def matches(self, module_path: str) -> bool:
        return self.regex.search(module_path) is not None

    def __str__(self) -> str:
        return self.regex.pattern + ("" if self.call is None else f":{self.call}")


@dataclass(frozen=True)
class StepSet:
    """A set of step numbers written as ``"all"`` or ``"0,2,5-7"``; ``ranges`` of None means all."""

    ranges: tuple[tuple[int, int], ...] | None

    def __contains__(self, step: object) -> bool:
        if self.ranges is None:
            return True
        return isinstance(step, int) and any(lo <= step <= hi for lo, hi in self.ranges)

    @property
    def last(self) -> int | None:
        """The highest selected step, or None when unbounded."""
        return None if self.ranges is None else max(hi for _, hi in self.ranges)

    def __str__(self) -> str:
        if self.ranges is None:
            return "all"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture. Build it with :func:`make_config`; the defaults capture everything of step 0."""

    modules: tuple[ModulePattern, ...] = ()
    types: frozenset[str] = frozenset()
    steps: StepSet = field(default_factory=lambda: StepSet(((0, 0),)))
    parts: frozenset[str] = PARTS["both"]
    mode: str = "tensor"
    devices: tuple[str, ...] = ()
    ranks: frozenset[int] | None = None
    max_tensor_size: int | None = None
    hash: bool = False
    scope: tuple[ModulePattern, ModulePattern] | None = None
    level: str = "module"
    ops_file: str | None = None
    ops_allow: tuple[str, ...] = ()
    ops_deny: tuple[str, ...] = ()

    def selects_module(self, module_path: str, type_name: str) -> bool:
        """Whether any call of this module can be captured (call indices are checked later)."""
        if self.types and type_name not in self.types:
            return False
        return not self.modules or any(p.matches(module_path) for p in self.modules)

    def selects_call(self, module_path: str, call: int) -> bool:
        """Whether call number ``call`` (within its step) of a selected module is captured."""
        if not self.modules:
            return True
        return any(p.matches(module_path) and (p.call is None or p.call == call) for p in self.modules)

    def selects_device(self, device: str) -> bool:
        return not self.devices or device in self.devices or device.split(":")[0] in self.devices

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-able options that :func:`make_config` accepts back."""
        return {
            "modules": [str(p) for p in self.modules],
            "types": sorted(self.types),
            "steps": str(self.steps),
            "parts": next(k for k, v in PARTS.items() if v == self.parts),
            "mode": self.mode,
            "devices": list(self.devices),
            "ranks": None if self.ranks is None else sorted(self.ranks),
            "max_tensor_size": self.max_tensor_size,
            "hash": self.hash,
            "scope": None if self.scope is None else [str(p) for p in self.scope],
            "level": self.level,
            "ops_file": self.ops_file,
            "ops_allow": list(self.ops_allow),
            "ops_deny": list(self.ops_deny),
        }


def parse_modules(value: str | Iterable[str] | None, option: str = "modules") -> tuple[ModulePattern, ...]:
    """Parse module patterns; a string is one regex (use a list for several)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    patterns = []
    for item in items:
        if not isinstance(item, str):
            raise UsageError(f"{option}: expected regex strings, got {item!r}")
        regex, call = item, None
        suffix = _CALL_SUFFIX.match(item)
        if suffix:
            regex, call = suffix["regex"], int(suffix["call"])
        try:
            patterns.append(ModulePattern(re.compile(regex), call))
        except re.error as exc:
            raise UsageError(f"{option}: {item!r} is not a valid regex ({exc})") from None
    return tuple(patterns)


def parse_steps(value: str | int | Iterable[int] | None, option: str = "steps") -> StepSet:
    """Parse ``"all"``, ``"0"``, ``"0-3"``, ``"0,2,5-7"``, an int or a list of ints."""
    if value is None or value == "all":
        return StepSet(None)
    if isinstance(value, bool):
        raise UsageError(f"{option}: expected 'all', a step number or ranges like '0,2,5-7', got {value!r}")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        try:
            value = ",".join(str(int(v)) for v in value)
        except (TypeError, ValueError):
            raise UsageError(f"{option}: expected a list of step numbers, got {value!r}") from None
    ranges = []
    for part in value.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"{option}: {value!r} is not 'all' or ranges like '0,2,5-7'")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi:
            raise UsageError(f"{option}: range {part!r} runs backwards (start > end)")
        ranges.append((lo, hi))
    return StepSet(tuple(sorted(ranges)))


def _choice(value: Any, allowed: Iterable[str], option: str) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _str_list(value: Any, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise UsageError(f"{option}: expected a list of strings, got {value!r}")
    return tuple(items)


def _int_list(value: Any, option: str) -> frozenset[int] | None:
    if value is None or value == "all":
        return None
    items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, int) else value)
    try:
        return frozenset(int(v) for v in items)
    except (TypeError, ValueError):
        raise UsageError(f"{option}: expected integers like '0,1', got {value!r}") from None


def make_config(
    modules: str | Iterable[str] | None = None,
    types: str | Iterable[str] | None = None,
    steps: str | int | Iterable[int] | None = "0",
    parts: str = "both",
    mode: str = "tensor",
    devices: str | Iterable[str] | None = None,
    ranks: str | int | Iterable[int] | None = None,
    max_tensor_size: int | None = None,
    hash: bool = False,
    scope: Iterable[str] | None = None,
    level: str = "module",
    ops_file: str | None = None,
    ops_allow: str | Iterable[str] | None = None,
    ops_deny: str | Iterable[str] | None = None,
) -> CaptureConfig:
    """Validate user options and build a :class:`CaptureConfig`. Raises :class:`UsageError`."""
    if max_tensor_size is not None and (
        isinstance(max_tensor_size, bool) or not isinstance(max_tensor_size, int) or max_tensor_size < 0
    ):
        raise UsageError(f"max_tensor_size: expected a non-negative element count, got {max_tensor_size!r}")
    window = None
    if scope is not None:
        items = [scope] if isinstance(scope, str) else list(scope)
        if len(items) != 2:
            raise UsageError(f"scope: expected [first, last] module regexes, got {scope!r}")
        first, last = parse_modules(items, "scope")
        window = (first, last)
    config = CaptureConfig(
        modules=parse_modules(modules),
        types=frozenset(_str_list(types, "types")),
        steps=parse_steps(steps),
        parts=PARTS[_choice(parts, PARTS, "parts")],
        mode=_choice(mode, MODES, "mode"),
        devices=_str_list(devices, "devices"),
        ranks=_int_list(ranks, "ranks"),
        max_tensor_size=max_tensor_size,
        hash=bool(hash),
        scope=window,
        level=_choice(level, LEVELS, "level"),
        ops_file=None if ops_file is None else str(ops_file),
        ops_allow=_str_list(ops_allow, "ops_allow"),
        ops_deny=_str_list(ops_deny, "ops_deny"),
    )
    if config.level != "module" or config.ops_file is not None:
        op_filter(config)  # a bad ops file is an error now, not in the middle of a run
    return config


DEFAULT_OPS_FILE = Path(__file__).with_name("ops.yaml")

#: Python operators on tensors, named like the functions they stand for (``a @ b`` → ``matmul``).
OPERATORS = frozenset({
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv", "itruediv",
    "floordiv", "rfloordiv", "mod", "rmod", "pow", "rpow", "ipow", "matmul", "rmatmul", "neg", "pos", "abs",
    "invert", "and", "rand", "or", "ror", "xor", "rxor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge",
    "getitem", "setitem"})


def normalize_op_name(name: str) -> str:
    """An op's name as llmdiff records it: operator dunders lose their underscores (``__mul__`` → ``mul``)."""
    if name.startswith("__") and name.endswith("__") and name[2:-2] in OPERATORS:
        return name[2:-2]
    return name


@dataclass(frozen=True)
class OpFilter:
    """Which ops to record, by name (:func:`llmdiff.capture.ops.op_name`): those in ``allow`` when it is
    not empty, else all but those in ``deny``."""

    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    def __call__(self, name: str) -> bool:
        if self.allow:
            return name in self.allow
        return name not in self.deny


def load_op_filter(path: str | Path | None = None, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> OpFilter:
    """The lists of ``path`` (default: the shipped ``ops.yaml``) plus ``allow``/``deny`` given directly."""
    file = Path(path) if path is not None else DEFAULT_OPS_FILE
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"ops_file: cannot read {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"ops_file: {file} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not set(data) <= {"allow", "deny"}:
        raise UsageError(f"ops_file: {file} must hold 'allow' and/or 'deny' lists of op names")
    lists = {}
    for key in ("allow", "deny"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UsageError(f"ops_file: {file}: '{key}' must be a list of op names")
        lists[key] = items
    return OpFilter(frozenset([*lists["allow"], *allow]), frozenset([*lists["deny"], *deny]))


def op_filter(config: CaptureConfig) -> OpFilter:
    """The op filter ``config`` asks for."""
    return load_op_filter(config.ops_file, config.ops_allow, config.ops_deny)


OPTION_NAMES = frozenset(f.name for f in fields(CaptureConfig))

#: vLLM's ``--intermediate-log-config`` keys. ``max_tensor_size`` is shared with llmdiff's own options.
VLLM_KEYS = frozenset({"enabled", "output_dir", "module_call_match", "log_step_ids", "max_tensor_size",
                       "device_names"})
VLLM_DEFAULT_OUTPUT_DIR = "/tmp/vllm_intermediates"


def is_vllm_config(options: Mapping[str, Any]) -> bool:
    """Whether a JSON object is a vLLM intermediate-logging config rather than llmdiff options."""
    return bool(options) and set(options) <= VLLM_KEYS and bool(set(options) - {"max_tensor_size"})


@dataclass(frozen=True)
class VllmLogConfig:
    """A vLLM intermediate-logging config, read as vLLM documents it: ``module_call_match`` regexes
    (string or list, ``:i`` = i-th call), ``log_step_ids`` (default ``[0]``), ``device_names`` (default
    all), ``max_tensor_size`` (larger tensors keep statistics here, where vLLM skips them),
    ``output_dir`` (default ``/tmp/vllm_intermediates``; each run gets a new sub-folder), ``enabled``."""

    capture: CaptureConfig
    output_dir: Path
    enabled: bool

    def new_run_dir(self) -> Path:
        """``<output_dir>/<random id>``, as vLLM names its runs."""
        import uuid

        return self.output_dir / str(uuid.uuid4())


def vllm_config(options: Mapping[str, Any], source: str = "config") -> VllmLogConfig:
    """Translate vLLM's ``--intermediate-log-config`` object. Raises :class:`UsageError` on bad values."""
    unknown = sorted(set(options) - VLLM_KEYS)
    if unknown:
        raise UsageError(f"{source}: unknown vLLM intermediate-log option(s) {', '.join(unknown)}")
    steps = options.get("log_step_ids", [0])
    if isinstance(steps, int):
        steps = [steps]
    # Parsed here rather than by make_config so that errors name vLLM's options.
    capture = replace(
        make_config(max_tensor_size=options.get("max_tensor_size")),
        modules=parse_modules(options.get("module_call_match"), f"{source}: module_call_match"),
        steps=parse_steps(steps if steps else "all", f"{source}: log_step_ids"),
        devices=tuple(d.replace("_", ":") for d in _str_list(options.get("device_names"), f"{source}: device_names")))
    enabled = options.get("enabled", True)
    if not isinstance(enabled, bool):
        raise UsageError(f"{source}: enabled: expected true or false, got {enabled!r}")
    output_dir = options.get("output_dir") or VLLM_DEFAULT_OUTPUT_DIR
    if not isinstance(output_dir, str):
        raise UsageError(f"{source}: output_dir: expected a path, got {output_dir!r}")
    return VllmLogConfig(capture, Path(output_dir), enabled)


def config_from_mapping(options: Mapping[str, Any], source: str = "config") -> CaptureConfig:
    """Build a config from a JSON object: llmdiff options (a config file, the environment of a zero-code
    run) or a vLLM intermediate-logging config (see :class:`VllmLogConfig`)."""
    if is_vllm_config(options):
        return vllm_config(options, source).capture
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise UsageError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTION_NAMES))}")
    return make_config(**options)


def load_config_file(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """Read a JSON config file (or inline JSON, as vLLM's ``--intermediate-log-config '{...}'``) into plain
    options (validated later by :func:`config_from_mapping`). ``option`` names the source in errors."""
    try:
        text = str(path) if str(path).lstrip().startswith("{") else Path(path).read_text()
        data = json.loads(text)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option}: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{option}: {path} must hold a JSON object")
    return data

