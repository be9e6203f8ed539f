"""Op-level capture: every ``torch.*``, ``torch.nn.functional.*`` and Tensor method call made inside
hooked modules, seen through one :class:`torch.overrides.TorchFunctionMode` pushed for the capture
and popped at its end (nothing is patched, so early-bound functions and Tensor methods are seen too
and nothing remains after the capture).

An op is named inside the innermost module running it: ``model.layers.0.self_attn/softmax``, with
its call index counted per step like a module's. Which ops are recorded is decided by name with the
allow/deny lists of ``llmdiff/ops.yaml`` or the user's own file (:func:`llmdiff.config.load_op_filter`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode

from llmdiff.config import normalize_op_name


def op_name(func: Callable[..., Any]) -> str:
    """``torch.softmax`` → ``softmax``; ``Tensor.__matmul__`` → ``matmul``; other dunders keep their
    underscores (``Tensor.shape.__get__`` → ``__get__``, ``Tensor.__bool__`` → ``__bool__``)."""
    return normalize_op_name(getattr(func, "__name__", None) or type(func).__name__)


class OpRecorder(TorchFunctionMode):
    """Calls ``record(name, args, kwargs, output)`` after each op whose name ``wanted(name)`` accepts,
    while ``active()`` is true (inside a hooked module, and not the capture's own computing).

    Inside ``__torch_function__`` the mode is off, so ops called by an op's own implementation are
    not seen as separate calls. Most ops are not wanted (``size``, ``dim``, ``shape``...): the name and
    the answer of ``wanted`` are kept per function, so such an op costs one dictionary lookup.
    """

    def __init__(self, wanted: Callable[[str], bool], active: Callable[[], bool],
                 record: Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]) -> None:
        super().__init__()
        self.wanted, self.active, self.record = wanted, active, record
        self._known: dict[Any, tuple[str, bool]] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        known = self._known.get(func)
        if known is None:
            name = op_name(func)
            known = self._known[func] = (name, self.wanted(name))
        if known[1] and self.active():
            self.record(known[0], args, kwargs, output)
        return output
