"""SIGTERM as an exception, so that a stage stopped by `kill`, `docker stop` or a scheduler's
time limit cleans up as Ctrl-C does.

Python's default SIGTERM ends the process at once: no ``finally`` runs, staged outputs stay
behind and the MLflow run is left RUNNING. Raised instead at the line the stage has reached,
:class:`Terminated` unwinds every ``with`` block: the run ends as KILLED
(:func:`pneumo.mlops.tracking.start_run`), a staged output folder is removed
(:func:`pneumo.files.staged_dir`), and the command exits with 143 (128 + 15), the status a
shell reports for a process killed by SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so code that stops cleanly on Ctrl-C (and never
    swallows it in ``except Exception``) stops cleanly on SIGTERM too."""


def _raise_terminated(signum: int, frame: object) -> None:
    # Once is enough: a second SIGTERM (a process group signalled twice) must not interrupt
    # the clean-up the first one started. SIGKILL still ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler comes back
    afterwards. Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
