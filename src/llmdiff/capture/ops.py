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
    """Calls ``record(name, func, args, kwargs, output)`` after each op that ``wanted(name)``.

    ``busy()`` true means the capture itself is computing (statistics, copies): its own ops pass
    through unrecorded. Inside ``__torch_function__`` the mode is off, so ops called by an op's
    own implementation are not seen as separate calls.
    """

    def __init__(self, wanted: Callable[[str], bool], busy: Callable[[], bool],
                 record: Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]) -> None:
        super().__init__()
        self.wanted, self.busy, self.record = wanted, busy, record
        self._names: dict[Any, str] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.busy():
            return output
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = op_name(func)
        if self.wanted(name):
            self.record(name, args, kwargs, output)
        return output
