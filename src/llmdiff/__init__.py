"""llmdiff: capture the intermediate tensors of two LLM runs and find where they start to disagree.

The public API::

    run = llmdiff.capture(model, "runs/fp32", modules=[r"layers\\.0\\."], steps="0-3")
    llmdiff.save(tensor, "my_point")
    llmdiff.seed_all(1234, deterministic=True)
    dump = llmdiff.open_dump("runs/fp32")
    report = llmdiff.compare("runs/fp32", "runs/bf16")
    weights = llmdiff.compare_weights("model.gguf", "converted/")
"""

__version__ = "0.1.0"

from llmdiff.api import compare, compare_weights
from llmdiff.capture.seed import seed_all
from llmdiff.capture.session import Capture, LlmdiffWarning, capture, save
from llmdiff.config import CaptureConfig, make_config
from llmdiff.errors import LlmdiffError
from llmdiff.report.model import Report
from llmdiff.store.reader import Dump, open_dump

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
