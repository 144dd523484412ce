"""SIGTERM handling: finish the step, checkpoint, exit 0, all within a grace period.

TPU VM maintenance events and schedulers send SIGTERM and kill a little later. A Python signal handler runs only
between bytecodes of the main thread, so while that thread waits inside XLA (a long step, a hung collective, a
stuck allocation) it would not run at all. Instead the signal is noticed through `signal.set_wakeup_fd`: the
interpreter's C-level handler writes the signal number to a socket at once, and a watcher thread reading that
socket sets the flag and starts the watchdog. The loop checks the flag between steps; the watchdog makes sure the
process is gone before the grace period ends even if the main thread never gets back (the previous checkpoint
stays valid: Orbax commits atomically).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time


class PreemptionGuard:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self._previous = None
        self._previous_fd = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread's handlers: nothing to install from elsewhere
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # the C handler must never block on a full buffer
        self._sockets = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        # The Python-level handler has nothing left to do, but a handler must be installed for the C-level one
        # (and so the wakeup write) to run instead of the default action, which would kill the process.
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        threading.Thread(target=self._watch, args=(reader,), daemon=True, name="meshforge-sigterm").start()
        return self

    def __exit__(self, *exc) -> None:
        if self._sockets is None:
            return
        signal.signal(signal.SIGTERM, self._previous)
        signal.set_wakeup_fd(self._previous_fd)
        reader, writer = self._sockets
        writer.close()
        reader.shutdown(socket.SHUT_RDWR)  # wakes the watcher, which then ends
        self._sockets = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:  # the socket also carries other signals the interpreter handles
                self._on_sigterm()

    def _on_sigterm(self) -> None:
        if self.requested:
            return
        self.requested_at = time.monotonic()
        print(f"meshforge: SIGTERM received; checkpointing and exiting within {self.grace_s:.0f}s",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_s)
        print(f"meshforge: the grace period of {self.grace_s:.0f}s ran out before the checkpoint finished; "
              "exiting (the previous checkpoint is intact)", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)
