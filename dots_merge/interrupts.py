"""Ctrl-C and SIGTERM as one interrupt that cannot be lost.

Python turns a signal into KeyboardInterrupt wherever the main thread is; when that is inside a C extension that
reports and swallows exceptions (scipy's Sobol set-up, for one: "Exception ignored in ..."), the program would go on
as if nothing happened. Inside `interrupts_stop_the_run()` the signal is also remembered, and `raise_if_interrupted()`
at the trial loop's safe points raises it again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = False


def _interrupt(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_stop_the_run() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt where the program is, and are remembered until the block ends."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = False
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal arrived whose exception something swallowed."""
    if _pending:
        raise KeyboardInterrupt
