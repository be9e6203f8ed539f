"""Capture: hooks that copy tensors out of a running model, and the session that owns them."""
