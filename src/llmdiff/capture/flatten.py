"""Turn nested module arguments and outputs into ``(path, tensor)`` pairs.

Tuples and lists give indices (``"0.1"``), mappings give keys, dataclasses and Hugging Face
``ModelOutput`` give field names (``"logits"``). Other objects (caches, configs) are not entered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

_MAX_DEPTH = 8


_INDEX = [str(i) for i in range(64)]
_LEAVES = (type(None), bool, int, float, str)


def flatten(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``obj`` with its dotted path, in a stable order."""
    if isinstance(obj, torch.Tensor):  # the common cases first: hooks run this for every module call
        return [("", obj)]
    found: list[tuple[str, torch.Tensor]] = []
    if type(obj) is tuple and len(obj) <= len(_INDEX):
        for i, v in enumerate(obj):
            if isinstance(v, torch.Tensor):
                found.append((_INDEX[i], v))
            elif not isinstance(v, _LEAVES):
                _walk(v, _INDEX[i], 1, found)
        return found
    if type(obj) is dict:  # keyword arguments
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                found.append((str(k), v))
            elif not isinstance(v, _LEAVES):
                _walk(v, str(k), 1, found)
        return found
    _walk(obj, "", 0, found)
    return found


_OPAQUE, _MAPPING, _SEQUENCE, _DATACLASS = range(4)
_KINDS: dict[type, int] = {}  # how a type is entered, found once per type (an ABC or dataclass check costs ~1 us)


def _kind(cls: type) -> int:
    kind = _KINDS.get(cls)
    if kind is None:
        if issubclass(cls, Mapping):  # includes transformers' ModelOutput, an OrderedDict of set fields
            kind = _MAPPING
        elif issubclass(cls, (tuple, list)):
            kind = _SEQUENCE
        elif dataclasses.is_dataclass(cls):
            kind = _DATACLASS
        else:
            kind = _OPAQUE
        _KINDS[cls] = kind
    return kind


def _walk(obj: Any, path: str, depth: int, found: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append((path, obj))
        return
    kind = _kind(type(obj))
    if kind == _OPAQUE or depth >= _MAX_DEPTH:
        return
    if kind == _MAPPING:
        items: Any = ((str(k), v) for k, v in obj.items())
    elif kind == _SEQUENCE:
        items = enumerate(obj)
    else:
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    for key, value in items:
        _walk(value, f"{path}.{key}" if path else str(key), depth + 1, found)
