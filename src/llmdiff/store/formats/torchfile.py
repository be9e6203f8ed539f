"""Read one tensor from a foreign ``.pt``/``.pth`` file without ever executing code from it.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers; anything else (a
pickle that would import a module or call a function) is refused with an error naming the file.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from llmdiff.errors import DumpError


def load_object(path: Path, *, mmap: bool = False) -> Any:
    """Unpickle ``path`` with ``weights_only=True`` (tensors, numbers, strings, lists, dicts only)."""
    if not path.is_file():  # a FIFO or a device would block or never end
        raise DumpError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then reads fine
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "not plain tensor data"
        raise DumpError(f"{path}: refused to load: it holds more than tensors and plain data, and loading it "
                        f"would run code ({reason[:160]})") from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (non-zip) files cannot be memory-mapped
            return load_object(path, mmap=False)
        raise DumpError(f"{path}: not a readable PyTorch file ({str(exc).splitlines()[0][:160]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, AttributeError,
            IndexError, RecursionError, MemoryError) as exc:
        raise DumpError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {str(exc)[:160]})") from None


def select(obj: Any, key: str, path: Path) -> torch.Tensor:
    """The tensor at dotted ``key`` inside ``obj`` (``""``: ``obj`` itself; ``"value"``, ``"0.1"``...)."""
    for part in key.split(".") if key else ():
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise DumpError(f"{path}: no tensor at {key!r}")
    if not isinstance(obj, torch.Tensor):
        raise DumpError(f"{path}: expected a tensor{f' at {key!r}' if key else ''}, found {type(obj).__name__}")
    return obj


def load_tensor(path: Path, key: str = "") -> torch.Tensor:
    """The tensor stored in ``path`` (at ``key`` when the file holds a container)."""
    return select(load_object(path), key, path)


def tensors_in(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded object with its dotted key, in a stable order."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return []
    out: list[tuple[str, torch.Tensor]] = []
    for k, v in items:
        out.extend(tensors_in(v, f"{prefix}.{k}" if prefix else k))
    return out


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float32`` or ``"torch.float32"`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def describe(path: Path) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) of every tensor in ``path``, read memory-mapped (the data is not loaded)."""
    return [(key, list(t.shape), dtype_name(t.dtype)) for key, t in tensors_in(load_object(path, mmap=True))]
