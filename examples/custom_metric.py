"""A user metric for `llmdiff compare --algorithm examples/custom_metric.py:max_ratio` (msIT's
signature: take the golden and target tensors, return a value and a message)."""

import torch


def max_ratio(golden: torch.Tensor, target: torch.Tensor) -> tuple[float, str]:
    """How much larger the target's largest magnitude is than the golden's."""
    g = golden.double().abs().max()
    return float(target.double().abs().max() / g) if g > 0 else 1.0, "ratio of max |x|"
