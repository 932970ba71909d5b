"""SIGTERM and Ctrl-C end a working run even when Python swallows the first interrupt.

Inside a step's compute Dagster turns SIGTERM/SIGINT into a DagsterExecutionInterruptedError
raised from the signal handler. Python runs a signal handler wherever the main thread is, and when
that is a garbage-collector callback (a WeakSet's `_remove`, a `__del__`) the exception is printed
as "Exception ignored in ..." and dropped: the step goes on and the run ends in SUCCESS, as if no
signal came (measured: about one signal in ten, one or two seconds into the smoke profile's steps).

`install()` wraps Dagster's `raise_interrupts_as` so that a signal is also remembered: the handler
re-sends it to the process a second later unless the error it raised has propagated by then, and a
step whose compute ends with a signal still pending fails with the same error. Installed with the
definitions (orchestration/definitions.py), like orchestration/pool_wait.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

RESEND_AFTER_S = 1.0


def install() -> None:
    from dagster._core import errors
    from dagster._utils import interrupts

    if getattr(errors.raise_interrupts_as, "_vas_sticky", False):
        return
    original = interrupts.raise_interrupts_as

    @contextlib.contextmanager
    def raise_interrupts_as(error_cls):
        pending: dict[str, int | None] = {"signal": None}
        with original(error_cls):
            if threading.current_thread() is not threading.main_thread():
                yield                                    # signal handlers live in the main thread only
                return
            raiser = signal.getsignal(signal.SIGINT)     # what `original` installed: raises error_cls

            def handler(signo, frame):
                pending["signal"] = signo
                threading.Timer(RESEND_AFTER_S, _resend, (pending, signo)).start()
                raiser(signo, frame)

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, handler)
            try:
                yield
            except BaseException:
                pending["signal"] = None                 # it (or another error) propagated: nothing to re-send
                raise
            if pending["signal"] is not None:            # raised into a callback that dropped it
                pending["signal"] = None
                raise error_cls()

    raise_interrupts_as._vas_sticky = True
    errors.raise_interrupts_as = raise_interrupts_as


def _resend(pending: dict, signo: int) -> None:
    if pending["signal"] == signo:
        os.kill(os.getpid(), signo)
