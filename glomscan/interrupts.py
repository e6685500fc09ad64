"""Ctrl-C during a batch, taken at a safe point instead of wherever Python happens to be.

Python raises KeyboardInterrupt in the main thread at the next bytecode, which can be inside a
C library's callback into Python (libvips' log handler, for one); cffi then prints "Exception
ignored from cffi callback" and the batch carries on as if nothing was pressed. While a batch
runs, the first SIGINT only sets a flag that the tile loop and the slide loop check
(``raise_if_interrupted``); a second SIGINT raises at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)

_requested = threading.Event()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt when Ctrl-C was pressed since ``deferred_sigint`` began."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt  # second Ctrl-C: stop now
    _requested.set()
    log.warning("Ctrl-C: stopping after the current tile batch (press Ctrl-C again to stop at once)")


@contextlib.contextmanager
def deferred_sigint():
    """Within the block, SIGINT sets the flag ``raise_if_interrupted`` checks. Outside the main
    thread (signal handlers cannot be installed there) or when SIGINT is ignored, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
