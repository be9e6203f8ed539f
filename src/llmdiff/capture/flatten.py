"""Turn nested module arguments and outputs into ``(path, tensor)`` pairs.

Tuples and lists give indices (``"0.1"``), mappings give keys, dataclasses and Hugging Face
``ModelOutput`` give field names (``"logits"``). Other objects (caches, configs) are not entered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_MAX_DEPTH = 8


def flatten(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor inside ``obj`` with its dotted path, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth >= _MAX_DEPTH:
        return
    if isinstance(obj, Mapping):  # includes transformers' ModelOutput, an OrderedDict of set fields
        items: Any = ((str(k), v) for k, v in obj.items())
    elif isinstance(obj, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    else:
        return
    for key, value in items:
        yield from flatten(value, f"{path}.{key}" if path else key, depth + 1)
