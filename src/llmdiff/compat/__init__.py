"""Drop-in APIs for scripts written for other tools: :mod:`llmdiff.compat.msprobe` (msProbe's
``PrecisionDebugger``) and :mod:`llmdiff.compat.msit` (msIT's ``DumpConfig`` + ``register_hook``).
Both capture with llmdiff into llmdiff's format; vLLM's ``--intermediate-log-config`` files are read
by :func:`llmdiff.config.config_from_mapping` directly.
"""
