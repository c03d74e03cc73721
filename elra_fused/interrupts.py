"""A step's writes, taken whole: a Ctrl-C that arrives while they run waits for their end.

An ELRA step checks everything, runs the ``dots`` passes and the control law, and builds
every coefficient before it writes anything (:func:`elra_fused.core.plan_step`); a
failure up to there leaves the optimizer as it was. From the first write on -- the update
pass of each segment, the layout's fix-ups, the GradScaler and retrace-buffer
bookkeeping, closing a cycle -- a ``KeyboardInterrupt`` between two of them would leave
some parameters stepped and others not, and the law's state out of step with both.
:func:`uninterrupted` holds Ctrl-C back for that stretch (microseconds to milliseconds)
and raises it right after: the step then happened completely, as if the interrupt had
come a moment later.

Only Python's own SIGINT handler is replaced, and only in the main thread (the only one
that receives signals); a handler a framework installed stays in charge.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["uninterrupted"]


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block with SIGINT held back; raise ``KeyboardInterrupt`` after it if one
    arrived (never when the block itself raised: that error propagates)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
