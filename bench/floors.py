"""What the capture benchmarks run: llmdiff's capture modes, and the floors they are measured against.

A floor is a capture stripped to what any capture made of PyTorch module hooks pays, with none of
llmdiff's code: torch's own hook dispatch on every module (``hooks``), those hooks copying each tensor
they see (once each) and holding the copies until the forward pass ends, as a capture that may not lose
in-place changes must (``copies``), and, for op-level capture, a no-op ``TorchFunctionMode`` on top of the hooks
(``op-mode``). A goal below a floor cannot be met by hooks written in Python; what a mode costs above
its floor is llmdiff's own work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: The ``llmdiff.capture`` arguments of each measured mode (every module, every step); ``none`` is no capture.
CAPTURE_MODES: dict[str, dict[str, str]] = {
    "none": {}, "stats": {"mode": "stats"}, "tensor": {"mode": "tensor"},
    "op-stats": {"mode": "stats", "level": "op"}, "mix-tensor": {"mode": "tensor", "level": "mix"},
}

#: Each floor, as a report names it.
FLOORS: dict[str, str] = {
    "hooks": "hooks on every module doing nothing",
    "copies": "hooks copying each distinct tensor they see",
    "op-mode": "a no-op op mode plus hooks",
}

#: The floor each capture mode is held against.
FLOOR_OF: dict[str, str] = {"stats": "copies", "tensor": "copies", "op-stats": "op-mode", "mix-tensor": "op-mode"}


def _tensors(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _hooks(copy: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    # The copies are held until the forward pass ends, and a tensor seen again (a layer's output is the next
    # one's input) is copied once, as llmdiff does; the originals are held too, so that an id is not reused.
    held: dict[int, tuple[Any, Any]] = {}
    depth = [0]

    def keep(value: Any) -> None:
        for tensor in _tensors(value):
            if held.get(id(tensor), (None,))[0] is not tensor:
                held[id(tensor)] = (tensor, tensor.clone())

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        if copy:
            keep((args, kwargs))

    def post(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        depth[0] -= 1
        if copy:
            keep(output)
            if depth[0] == 0:
                held.clear()  # the forward pass is over: a capture would have handed its copies on by now

    return pre, post


@contextmanager
def floor(model: Any, name: str) -> Iterator[None]:
    """Run the body under floor ``name`` (one of :data:`FLOORS`) on every module of ``model``."""
    from torch.overrides import TorchFunctionMode

    if name not in FLOORS:
        raise ValueError(f"unknown floor {name!r}: choose from {', '.join(FLOORS)}")
    pre, post = _hooks(copy=name == "copies")
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    class NoOpMode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            return func(*args, **(kwargs or {}))

    try:
        if name == "op-mode":
            with NoOpMode():
                yield
        else:
            yield
    finally:
        for handle in handles:
            handle.remove()
