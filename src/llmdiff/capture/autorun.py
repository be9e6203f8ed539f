"""Start-up of zero-code capture, run by ``llmdiff_autorun.pth`` in every Python process.

``llmdiff run`` sets ``LLMDIFF_RUN_DIR`` (and ``LLMDIFF_CONFIG``, the validated options as JSON);
the ``.pth`` file checks the variable before importing anything, so processes outside a run pay
nothing. Child processes inherit the environment and so capture too, each into its own folder.
Programs that start children with an explicit environment (``exec*e``, ``subprocess`` with
``env=...``) must pass these two variables on.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
from types import FrameType

RUN_DIR_ENV = "LLMDIFF_RUN_DIR"
CONFIG_ENV = "LLMDIFF_CONFIG"

_session = None


def start() -> None:
    """Begin capturing every model this process runs. Safe to call twice."""
    global _session
    if _session is not None or not os.environ.get(RUN_DIR_ENV):
        return
    try:
        from llmdiff.capture.session import Capture
        from llmdiff.config import config_from_mapping

        config = config_from_mapping(json.loads(os.environ.get(CONFIG_ENV) or "{}"), source=CONFIG_ENV)
        _session = Capture(None, os.environ[RUN_DIR_ENV], config, owns_run_dir=False).start()
    except Exception as exc:
        print(f"llmdiff: capture not started in pid {os.getpid()}: {exc}", file=sys.stderr)
        return
    atexit.register(stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _on_sigterm)


def stop() -> None:
    """Finish this process's capture: drain the writer and close the process folder."""
    global _session
    session, _session = _session, None
    if session is not None:
        try:
            session.stop()
        except Exception as exc:
            print(f"llmdiff: finishing the capture failed: {exc}", file=sys.stderr)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
