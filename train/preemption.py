"""SIGTERM handling: finish the step, checkpoint, exit 0, all within a grace period.

TPU VM maintenance events and schedulers send SIGTERM and kill a little later. The handler only sets a flag; the
loop checks it between steps. A watchdog makes sure the process is gone before the grace period ends even if the
checkpoint write hangs (the previous checkpoint stays valid: Orbax commits atomically).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


class PreemptionGuard:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _on_sigterm(self, signum, frame) -> None:
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
