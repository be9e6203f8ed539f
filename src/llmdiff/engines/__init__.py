"""Engine knowledge, one small module per engine; capture asks here instead of branching on engine names.

An engine module knows how capture attaches to that engine: which object holds the model, where a
step begins and ends, which forward passes are warm-ups, which rows of a flattened token dimension
belong to which request. Hugging Face models need none of this: with no engine module claiming a
model, a step is one outermost call (``generate``'s prefill, then one call per token).

The contract between :class:`~llmdiff.capture.session.Capture` and an engine module:

* :func:`resolve_model` turns what the user handed to ``llmdiff.capture`` (an engine object such as
  ``vllm.LLM``) into the ``nn.Module`` to hook, plus a hint for the engine module;
* :func:`engine_steps` is asked for every new root module; an engine that claims it returns an
  :class:`EngineSteps`, which then marks steps through ``Capture.engine_step_begin()`` /
  ``Capture.engine_step_end(metadata)`` and sees every outermost call inside a step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from llmdiff.capture.session import Capture
    from llmdiff.engines.canonical import Source

#: The engines whose dumps can be paired by canonical point: name -> module with ``canonical_sources``.
CANONICAL = {"hf": "llmdiff.engines.hf", "vllm": "llmdiff.engines.vllm", "sglang": "llmdiff.engines.sglang"}


def canonical_sources(engine: str, layers: int, config: dict[str, Any]) -> dict[tuple[str, str], Source]:
    """Where ``engine``'s dumps hold each canonical point (see :mod:`llmdiff.engines.canonical`)."""
    sources: dict[tuple[str, str], Source] = importlib.import_module(CANONICAL[engine]).canonical_sources(
        layers, config)
    return sources


@dataclass(frozen=True)
class Shard:
    """How one rank's tensor of a tensor-parallel run holds a piece of the whole.

    ``concat``: the last dimension is this rank's slice of each of ``widths``' parts, so the whole is, part
    by part, the ranks' slices side by side (a fused q/k/v output: every rank's q, then every rank's k...).
    ``sum``: a partial sum; the whole is the ranks' tensors added up (a row-parallel layer that does not
    reduce its output).
    """

    widths: tuple[int, ...] = ()
    combine: str = "concat"


def shard_of(engine: str, module: str, part: str, path: str, layout: dict[str, dict[str, Any]]) -> Shard | None:
    """How a rank's entry ``module part.path`` is sharded, from that rank's recorded parallel ``layout``
    (None: the tensor is whole on every rank, replicated)."""
    find = getattr(importlib.import_module(CANONICAL[engine]), "shard_of", None) if engine in CANONICAL else None
    found: Shard | None = find(module, part, path, layout) if find is not None and layout else None
    return found


class EngineSteps(Protocol):
    """Step marking for one engine-held model, owned by one capture."""

    def describe(self) -> dict[str, Any]:
        """What the dump should record about the engine (name, version, parallel layout, model shape)."""

    def root_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called for every outermost call of the model (inside or outside a step)."""

    def detach(self) -> None:
        """Undo whatever was attached; called once when the capture stops or pauses."""


def resolve_model(obj: Any) -> tuple[nn.Module | None, Any]:
    """The module to hook for ``obj`` and a hint for its engine module (``obj`` itself when it is a module)."""
    from torch import nn  # here, not at the top: the compare of statistics dumps asks this package, without torch

    if obj is None or isinstance(obj, nn.Module):
        return obj, None
    from llmdiff.engines import vllm

    found = vllm.resolve(obj)
    if found is not None:
        return found
    from llmdiff.errors import LlmdiffError

    raise LlmdiffError(f"cannot capture a {type(obj).__module__}.{type(obj).__qualname__}: pass a torch.nn.Module "
                       "or a vllm.LLM created with VLLM_ENABLE_V1_MULTIPROCESSING=0 (else use llmdiff run)")


def engine_steps(capture: Capture, root: nn.Module, hint: Any = None) -> EngineSteps | None:
    """The step marking of the engine that holds ``root``, or None for a plain PyTorch model."""
    if type(root).__module__.startswith("vllm."):
        from llmdiff.engines import vllm

        return vllm.VllmSteps(capture, root, hint)
    return None
