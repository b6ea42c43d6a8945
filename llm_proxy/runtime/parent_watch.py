"""The events process ends when its server does, however the server ends.

A server stops its events process by closing the process's input: the events process drains what it
was sent and exits at the end of file. A server that is killed closes nothing itself; the kernel
closes its end of the pipe, and the end of file comes as before, unless another process holds that
end too (one that inherited it), in which case it never comes and the events process, adopted by
init, runs on for good. So the events process asks the kernel (Linux's ``PR_SET_PDEATHSIG``) for
:data:`PARENT_GONE` when its parent ends, and treats it as the end of its input.

The signal is only a hint: it also comes when the parent *thread* that started this process ends,
and anyone may send it. :meth:`ParentWatch.parent_alive` is what decides, and it also covers a
parent that ended before the request was made (the kernel sends nothing then).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

# Not SIGTERM, which a service manager sends to the whole process group and which the events process
# ignores: the server decides when it stops.
PARENT_GONE = signal.SIGUSR1
_PR_SET_PDEATHSIG = 1


class ParentWatch:
    """Made first thing in the events process, with the pid of the server that started it."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def arm(self) -> None:
        """Ignore :data:`PARENT_GONE` until the loop handles it, and ask the kernel for it when the
        parent ends (Linux only; elsewhere the end of file is the only sign)."""
        signal.signal(PARENT_GONE, signal.SIG_IGN)
        if sys.platform != "linux":
            return
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_GONE), 0, 0, 0)

    def parent_alive(self) -> bool:
        """Whether the server that started this process is still its parent (once it ends, the
        process is adopted and its parent's pid changes)."""
        return os.getppid() == self.parent
