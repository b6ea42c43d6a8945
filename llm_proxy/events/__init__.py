"""Instrumentation events: one per proxied request, built off the request path and put on a bus.

The proxy installs an :class:`EventPipeline` (from :func:`start_event_pipeline`) as its
``ExchangeSink``; for streams whose usage it asked for, it runs a :class:`UsageChunkFilter` per
response to get exact usage without changing what the client sees.
"""

from llm_proxy.events.bus import BusUnavailable, Delivery, EventBus, Subscription
from llm_proxy.events.config import EventsConfig
from llm_proxy.events.event import Event, Usage
from llm_proxy.events.pipeline import EventPipeline, start_event_pipeline
from llm_proxy.events.usage_injection import UsageChunkFilter

__all__ = [
    "BusUnavailable",
    "Delivery",
    "Event",
    "EventBus",
    "EventPipeline",
    "EventsConfig",
    "Subscription",
    "Usage",
    "UsageChunkFilter",
    "start_event_pipeline",
]
