"""Whether the running task was asked to stop, for loops that are ended by cancelling them.

redis-py can swallow the ``CancelledError`` of a command it is running: a trim cancelled while
Redis was stalled was seen to complete normally once Redis answered, the cancellation never
raised (the exact path in redis-py is not known). A loop ended by ``task.cancel()`` then carries
on, and whoever awaits it after cancelling waits for ever. Seen with the events process of a
killed server, which never exited while Redis was slow to answer at that moment. The request to
cancel is still counted on the task (``Task.cancelling``), so such a loop checks it each round.
"""

from __future__ import annotations

import asyncio


def cancel_requested() -> bool:
    """Whether the running task has a cancellation pending, raised or swallowed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
