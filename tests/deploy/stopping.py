"""How long a stopping server may take after its grace, from the product's own bounds: what the
platform's stop timeout (Compose's stop_grace_period, the pod's terminationGracePeriodSeconds)
must hold beside GRACEFUL_SHUTDOWN_TIMEOUT and any preStop sleep."""

from __future__ import annotations

import inspect

from llm_proxy.events.offload import EventOffload
from llm_proxy.http.front import CUT_ANSWERS_END_WITHIN
from llm_proxy.runtime.app import TASK_STOP_SECONDS

# The answers the stop cut end, the background tasks stop, the events process drains.
AFTER_GRACE_SECONDS = (
    CUT_ANSWERS_END_WITHIN
    + TASK_STOP_SECONDS
    + inspect.signature(EventOffload).parameters["close_timeout"].default
)
