"""A run folder's own files: its name, its ``run.json``, and the stamps both ends of a run write.

Nothing here needs torch: ``llmdiff run`` prepares the folder before it starts the program it observes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from llmdiff.errors import LlmdiffError
from llmdiff.store.schema import FORMAT, FORMAT_VERSION, RUN_FILE


def now() -> str:
    """The time, as every file of a dump writes it (UTC, ISO 8601, milliseconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def versions() -> dict[str, str | None]:
    """Versions of the libraries that decide what a model computes: the imported ones', or else the installed
    ones' (a process that has not imported torch, such as ``llmdiff run`` itself)."""
    from llmdiff import __version__

    def version(name: str) -> str | None:
        loaded = getattr(sys.modules.get(name), "__version__", None)
        if loaded is not None or name == "transformers":  # transformers: only when the program uses it
            return loaded
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"llmdiff": __version__, "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers")}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def new_run_dir(base: Path = Path("llmdiff-runs")) -> Path:
    """A run folder under ``base`` named by the time, not yet taken (``<time>-1``... when it is)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, suffix = base / stamp, 1
    while run_dir.exists():
        run_dir, suffix = base / f"{stamp}-{suffix}", suffix + 1
    return run_dir


def prepare_run_dir(run_dir: Path, argv: list[str], config: dict[str, Any]) -> None:
    """Create a new run folder with its ``run.json`` (``config``: the capture options, as JSON); refuse to
    reuse a non-empty one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LlmdiffError(f"run dir {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise LlmdiffError(f"run dir {run_dir} already exists and is not empty; choose a new one "
                           "(nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": now(), "end": None,
        "argv": argv, "cwd": os.getcwd(), "host": platform.node(), "versions": versions(), "config": config,
    })


def finish_run_dir(run_dir: Path, **extra: Any) -> None:
    """Stamp the end time (and e.g. an exit code) into ``run.json``."""
    path = run_dir / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    data.update(end=now(), **extra)
    write_json_atomic(path, data)
