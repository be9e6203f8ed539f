"""llmdiff: capture the intermediate tensors of two LLM runs and find where they start to disagree.

The public API::

    run = llmdiff.capture(model, "runs/fp32", modules=[r"layers\\.0\\."], steps="0-3")
    llmdiff.save(tensor, "my_point")
    llmdiff.seed_all(1234, deterministic=True)
    dump = llmdiff.open_dump("runs/fp32")
    report = llmdiff.compare("runs/fp32", "runs/bf16")
    weights = llmdiff.compare_weights("model.gguf", "converted/")

Each name is imported on first use: the ``llmdiff`` command imports torch only where it needs it
(``compare``; not ``--help``, ``show`` or ``run``'s own process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# These subpackages first (they import nothing): importing one later would bind its name here, over the
# function of that name (``llmdiff.capture``, ``llmdiff.compare``), which is then found by ``__getattr__``.
import llmdiff.capture
import llmdiff.compare  # noqa: F401

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmdiff.api import compare, compare_weights
    from llmdiff.capture.seed import seed_all
    from llmdiff.capture.session import Capture, LlmdiffWarning, capture, save
    from llmdiff.config import CaptureConfig, make_config
    from llmdiff.errors import LlmdiffError
    from llmdiff.report.model import Report
    from llmdiff.store.reader import Dump, open_dump

#: each public name, and the module it lives in
_HOMES = {
    "compare": "llmdiff.api", "compare_weights": "llmdiff.api",
    "seed_all": "llmdiff.capture.seed",
    "Capture": "llmdiff.capture.session", "LlmdiffWarning": "llmdiff.capture.session",
    "capture": "llmdiff.capture.session", "save": "llmdiff.capture.session",
    "CaptureConfig": "llmdiff.config", "make_config": "llmdiff.config",
    "LlmdiffError": "llmdiff.errors",
    "Report": "llmdiff.report.model",
    "Dump": "llmdiff.store.reader", "open_dump": "llmdiff.store.reader",
}
del globals()["capture"], globals()["compare"]

__all__ = [
    "Capture",
    "CaptureConfig",
    "Dump",
    "LlmdiffError",
    "LlmdiffWarning",
    "Report",
    "__version__",
    "capture",
    "compare",
    "compare_weights",
    "make_config",
    "open_dump",
    "save",
    "seed_all",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'llmdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found here from now on
    return value


def __dir__() -> list[str]:
    return __all__
