"""What one benchmark run is asked to do, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from llm_proxy.tools.benchmark.client import Target

_DEFAULT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
# No HEAD: the parser cannot tell that a HEAD response has no body.
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_BODYLESS = frozenset({"GET", "DELETE"})


@dataclass(frozen=True, slots=True)
class BenchmarkConfig:
    """One benchmark run. Exactly one of ``requests`` (per route) and ``duration`` (seconds)."""

    base_url: str
    endpoint: str = "/v1/chat/completions"
    token: str | None = field(default=None, repr=False)
    requests: int | None = None
    duration: float | None = None
    concurrency: int = 1
    stream: bool = False
    method: str = "POST"
    body: bytes | None = None  # None: a small chat completion request for POST, nothing for GET
    compare_url: str | None = None
    compare_token: str | None = field(default=None, repr=False)
    warmup: int = 0  # requests per route before measuring, not recorded
    timeout: float = 60.0  # per request
    connect_timeout: float = 10.0  # per connection attempt: a loaded machine connects slowly

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration is None):
            raise ValueError("give exactly one of requests and duration")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.concurrency < 1 or self.warmup < 0 or min(self.timeout, self.connect_timeout) <= 0:
            raise ValueError("concurrency and timeout must be positive, warmup not negative")
        if self.compare_token is not None and self.compare_url is None:
            raise ValueError("compare_token needs compare_url")
        if self.method.upper() not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        for name, value in (
            ("endpoint", self.endpoint),
            ("token", self.token),
            ("compare_token", self.compare_token),
        ):
            if value and (not value.isprintable() or " " in value):
                raise ValueError(f"{name} must be printable and without spaces")
        self.target("proxy", self.base_url, self.token)
        if self.compare_url is not None:
            self.target("direct", self.compare_url, self.compare_token)

    def request_body(self) -> bytes | None:
        if self.body is not None:
            return self.body
        if self.method.upper() in _BODYLESS:
            return None
        return orjson.dumps({**_DEFAULT_BODY, "stream": True} if self.stream else _DEFAULT_BODY)

    def describe(self) -> dict[str, object]:
        """The settings worth printing next to the figures; never the tokens."""
        return {
            "base_url": self.base_url,
            "compare_url": self.compare_url,
            "endpoint": self.endpoint,
            "method": self.method.upper(),
            "concurrency": self.concurrency,
            "requests": self.requests,
            "duration": self.duration,
            "stream": self.stream,
            "warmup": self.warmup,
        }

    def target(self, name: str, base_url: str, token: str | None) -> Target:
        """The request one route is sent; ``ValueError`` if ``base_url`` is not an http(s) URL."""
        return Target.build(name, base_url, token, self.method, self.endpoint, self.request_body())
