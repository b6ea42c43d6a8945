"""Workers end when their supervisor does, however it ends.

The supervisor forwards SIGTERM and SIGINT to its workers, but a supervisor that is killed
(SIGKILL, the OOM killer, a test runner's last resort) forwards nothing, and its workers, adopted
by init, would keep the port and their events processes for as long as the machine runs. So the
supervisor holds the write end of a pipe it never writes to, and each worker watches the read
end: when the supervisor's process ends, the kernel closes its end and the read end turns
readable (end of file) in every worker at once, which then stops as on SIGTERM, finishing the
requests it holds. (gunicorn's workers poll their parent's pid for the same reason; the pipe
tells at once, without a timer.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


class Lifeline:
    """Made by the supervisor before it forks its workers."""

    def __init__(self) -> None:
        self._read_end, self._write_end = os.pipe()

    def in_worker(self) -> int:
        """In a forked worker: let go of the inherited write end (the pipe would otherwise never
        end while this worker lives) and return the end to watch."""
        os.close(self._write_end)
        return self._read_end

    def close(self) -> None:
        """In the supervisor, once its workers are gone."""
        os.close(self._read_end)
        os.close(self._write_end)


def watch(read_end: int, on_supervisor_gone: Callable[[], None]) -> None:
    """Call ``on_supervisor_gone`` once, from the running loop, when the supervisor has ended."""
    loop = asyncio.get_running_loop()

    def ended() -> None:
        loop.remove_reader(read_end)
        on_supervisor_gone()

    loop.add_reader(read_end, ended)
