"""Keeping long-lived objects out of Python's cycle collections while llmdiff builds many more of them."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[Callable[[], None]]:
    """What exists when the block starts is left out of Python's cycle collections until it ends.

    A compare allocates hundreds of thousands of objects (entries, results) that live until it ends, and
    each full collection walks every object of the process: on a decode dump pair (31k entries) they were
    a third of the measuring time, and writing its JSON report afterwards spent 0.7 of 1.6 s in them.
    Young collections still run as before (short-lived cycles can hold tensors: with the collector off, the
    prefill compare's peak memory rose from 0.5-0.6 GB to 0.9 GB in some runs); full ones are held off
    until the block ends. Yields what to call to leave out what exists by then too (the dumps, once read).
    Nested blocks leave it all to the outermost.
    """
    if gc.get_freeze_count():  # the program froze objects itself (or an outer block did): unfreezing would undo that
        yield lambda: None
        return
    young, middle, old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(young, middle, max(old, FULL_COLLECTIONS_HELD_OFF))
    try:
        yield gc.freeze
    finally:
        gc.set_threshold(young, middle, old)
        gc.unfreeze()


#: While a block runs, a full collection waits for this many middle-generation ones (Python's default: 10):
#: the results a compare accumulates are what full collections walked (6 a decode compare, 0.3-0.4 s), and
#: they live until it ends. Cycles still die in the young collections, which run as before.
FULL_COLLECTIONS_HELD_OFF = 1000
