"""AWS CloudWatch Logs backend through aiobotocore.

Creates the log group and stream if missing, then ``PutLogEvents`` in batches that respect the
service's limits: at most 10,000 events and 1,048,576 bytes (message bytes plus 26 per event),
256 KiB per event (counted the same way), chronological order, at most 24 hours apart. Events
CloudWatch would refuse for their age (older than 14 days, more than 2 hours ahead, or past the
group's retention) are refused here as permanent, so they go to the dead-letter file and are
counted, instead of being retried. Credentials that AWS
refuses (or that cannot be found) raise or refuse with ``auth``, so the worker stops.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from dispatcher import metrics
from dispatcher.backends import BackendError, Rejection, sizing
from dispatcher.backends.http import masked
from llm_proxy.crypto import mask_key
from llm_proxy.events.event import Event, parse_rfc3339

log = structlog.get_logger(__name__)

MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024
MAX_SPAN_MS = 24 * 3600 * 1000
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_AHEAD_MS = 2 * 3600 * 1000
# Our clock and AWS's may differ a little: refuse locally only what is past a limit by more than
# this; AWS answers for the rest (rejectedLogEventsInfo), per event.
_SAFETY_MS = 60_000
_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
        # Concurrent requests on one resource: two replicas creating the same group or stream.
        "OperationAbortedException",
    }
)
# What AWS answers for credentials it does not accept: unknown, badly signed, expired, or lacking
# the permission. Botocore has no class for these; the codes are the API's.
_AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "ExpiredToken",
        "AccessDeniedException",
        "AccessDenied",
        "AuthFailure",
    }
)
# A permission the key lacks (not a key AWS refuses): the other codes of _AUTH_CODES are those.
_DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied"})
_TRUNCATED = sizing.TRUNCATED
_FIELD_ROOM = 1024  # characters kept of a field other than the bodies, when the event is too large

Item = tuple[int, int, str]  # timestamp ms, index in the batch given to send, message

_NO_CREDENTIALS = Rejection("no AWS credentials found", retryable=False, auth=True)
# What AWS (or an endpoint in its place) may echo of a request: its access key id, in a
# Credential= scope or alone, and the request's signature.
_ACCESS_KEY_ID = re.compile(
    r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|APKA|ABIA|ACCA)[A-Z0-9]{12,}\b"
)
_SIGNATURE = re.compile(r"(Signature=)[0-9a-fA-F]{16,}")


def _denied(exc: ClientError) -> bool:
    """Whether ``exc`` says the key lacks a permission (not that AWS refuses the key)."""
    error = exc.response.get("Error", {})
    # An endpoint in AWS's place (moto) may answer this JSON API's denial in the query APIs' XML,
    # which botocore does not read: the code is then only in the message.
    return error.get("Code") in _DENIED_CODES or "<Code>AccessDenied</Code>" in str(
        error.get("Message", "")
    )


def _transient(exc: ClientError) -> bool:
    """Whether ``exc`` may pass on a later attempt: throttling, or the service failing."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in _RETRYABLE_CODES or status >= 500


def _auth_refusal(exc: ClientError) -> Rejection | None:
    """The rejection when ``exc`` refuses the credentials, else None. Only the code and status are
    kept: AWS messages may name the access key."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _AUTH_CODES or status in (401, 403):
        return Rejection(f"{code} (HTTP {status})", retryable=False, auth=True)
    return None


def message(event: Event, limit: int) -> str:
    """The event as JSON, with its bodies (and, if need be, other long texts) cut until it fits
    in ``limit`` bytes."""
    text = orjson.dumps(event)
    if len(text) <= limit:
        return text.decode()
    plain: dict[str, object] = dict(event)
    bodies = {key: orjson.dumps(plain[key]).decode() for key in ("request", "response")}
    room = limit // 2
    while room > 64:
        for key, body in bodies.items():
            plain[key] = body[:room] + _TRUNCATED if len(body) > room else orjson.loads(body)
        text = orjson.dumps(plain)
        if len(text) <= limit:
            return text.decode()
        room = room * 3 // 4
    plain["request"] = plain["response"] = _TRUNCATED
    text = orjson.dumps(plain)
    if len(text) > limit:
        # Still too large: a client chose a field's length (a made-up model name), and AWS would
        # refuse the whole batch for this one event. Cut those too.
        for key, value in plain.items():
            if isinstance(value, str) and len(value) > _FIELD_ROOM:
                plain[key] = value[:_FIELD_ROOM] + _TRUNCATED
        text = orjson.dumps(plain)
    return text.decode()


def batches(items: Sequence[Item]) -> Iterator[list[Item]]:
    """Split chronologically sorted items into batches within every PutLogEvents limit."""
    return sizing.batches(
        items,
        lambda item: len(item[2].encode()) + EVENT_OVERHEAD,
        max_items=MAX_BATCH_EVENTS,
        max_bytes=MAX_BATCH_BYTES,
        apart=lambda first, item: item[0] - first[0] > MAX_SPAN_MS,
    )


def configured_region() -> str | None:
    """The region botocore finds where boto3 and the AWS CLI look (``AWS_DEFAULT_REGION``, the
    profile's config file), or None."""
    try:
        region = get_session().get_config_variable("region")
    except BotoCoreError:  # a profile named that does not exist: no region found there
        return None
    return str(region) if region else None


class CloudWatchBackend:
    name = "cloudwatch"

    def __init__(
        self,
        log_group: str,
        log_stream: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        # AWS counts an event's 26 bytes of overhead against its 256 KiB too, and refuses the
        # whole request for one event over it.
        max_message_bytes: int = MAX_EVENT_BYTES - EVENT_OVERHEAD,
    ) -> None:
        self.log_group = log_group
        self.log_stream = log_stream
        self._region = region
        self._endpoint_url = endpoint_url
        # None: botocore's own credential chain (environment, profile, instance role).
        self._credentials = {
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
        }
        self._max_message_bytes = max_message_bytes
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def __repr__(self) -> str:
        return f"CloudWatchBackend(log_group={self.log_group!r}, log_stream={self.log_stream!r})"

    async def start(self) -> None:
        config = AioConfig(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "logs",
                region_name=self._region,
                endpoint_url=self._endpoint_url,
                config=config,
                **self._credentials,
            )
        )
        try:
            await self._ensure_destination(may_exist=True)
        except NoCredentialsError:
            raise BackendError(_NO_CREDENTIALS.reason, retryable=False, auth=True) from None
        except ClientError as exc:
            refused = _auth_refusal(exc)
            if refused is not None:
                raise BackendError(refused.reason, retryable=False, auth=True) from None
            error = exc.response.get("Error", {})
            reason = self._masked(f"{error.get('Code', '')}: {error.get('Message', '')}")
            if not _transient(exc):
                raise BackendError(reason, retryable=False) from None
            # Throttled (dispatchers starting together) or unavailable for now: as below.
            log.warning("dispatcher.cloudwatch_unavailable_at_start", error=reason)
        except (EndpointUnreachable, HTTPClientError, OSError) as exc:
            # Unreachable for now (no network yet, the endpoint restarting): waited for as a
            # failed put is. The first put that gets through creates what is missing.
            log.warning("dispatcher.cloudwatch_unavailable_at_start", error=self._masked(str(exc)))
        except BotoCoreError as exc:
            raise BackendError(self._masked(str(exc)), retryable=False) from None

    async def _ensure_destination(self, *, may_exist: bool = False) -> None:
        """Create the group and stream if missing. With ``may_exist``, a key not allowed to create
        them is no failure yet: least privilege gives a dispatcher PutLogEvents alone on a group
        and stream made beforehand, and the first put finds out whether they are there.
        Without it, a key not allowed to create the group may still create the stream in it (the
        policy log shippers are given); the refusal counts when the group is missing."""
        denied: ClientError | None = None
        for action, kwargs in (
            ("create_log_group", {"logGroupName": self.log_group}),
            (
                "create_log_stream",
                {"logGroupName": self.log_group, "logStreamName": self.log_stream},
            ),
        ):
            try:
                await getattr(self._client, action)(**kwargs)
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                if code == "ResourceAlreadyExistsException":
                    continue
                if _denied(exc) and (may_exist or action == "create_log_group"):
                    log.info("dispatcher.cloudwatch_create_not_allowed", action=action)
                    denied = exc
                    continue
                if denied is not None and code == "ResourceNotFoundException":
                    raise denied from None  # no group, and no right to make it
                raise

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        now = time.time() * 1000
        refused: dict[int, Rejection] = {}
        items: list[Item] = []
        for i, event in enumerate(events):
            stamp = round(parse_rfc3339(event["timestamp"]) * 1000)
            if stamp < now - MAX_AGE_MS - _SAFETY_MS:
                refused[i] = self._rejected("too_old", "older than 14 days")
            elif stamp > now + MAX_AHEAD_MS + _SAFETY_MS:
                refused[i] = self._rejected("too_new", "more than 2 hours in the future")
            else:
                items.append((stamp, i, message(event, self._max_message_bytes)))
        items.sort()
        for batch in batches(items):
            refused.update(await self._put(batch))
        return refused

    async def _put(self, batch: list[Item]) -> dict[int, Rejection]:
        request = {
            "logGroupName": self.log_group,
            "logStreamName": self.log_stream,
            "logEvents": [{"timestamp": stamp, "message": text} for stamp, _, text in batch],
        }
        try:
            try:
                answer = await self._client.put_log_events(**request)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                    raise
                await self._ensure_destination()  # deleted under us: recreate and try once more
                answer = await self._client.put_log_events(**request)
        except ClientError as exc:
            refused = _auth_refusal(exc)
            if refused is not None:
                return dict.fromkeys((i for _, i, _ in batch), refused)
            error = exc.response["Error"]
            reason = self._masked(f"{error['Code']}: {error.get('Message', '')}")
            return {i: Rejection(reason, _transient(exc)) for _, i, _ in batch}
        except NoCredentialsError:
            return dict.fromkeys((i for _, i, _ in batch), _NO_CREDENTIALS)
        except (BotoCoreError, OSError) as exc:
            reason = self._masked(f"{type(exc).__name__}: {exc}")
            return {i: Rejection(reason, True) for _, i, _ in batch}
        return self._partial(batch, answer.get("rejectedLogEventsInfo") or {})

    def _masked(self, text: str) -> str:
        """A reason as logs and the dead-letter file may show it: the credentials given, anything
        shaped like an access key id or a key, and signatures masked."""
        secrets = [value for value in self._credentials.values() if value]
        text = _SIGNATURE.sub(r"\1…", masked(text, secrets))
        return _ACCESS_KEY_ID.sub(lambda found: mask_key(found.group(0)), text)

    def _partial(self, batch: list[Item], info: dict[str, int]) -> dict[int, Rejection]:
        """Events CloudWatch dropped from an accepted batch (indices into the batch)."""
        refused: dict[int, Rejection] = {}
        too_old = info.get("tooOldLogEventEndIndex", -1)
        expired = info.get("expiredLogEventEndIndex", -1)
        too_new = info.get("tooNewLogEventStartIndex", len(batch))
        for position, (_, i, _) in enumerate(batch):
            if position < too_old:
                refused[i] = self._rejected("too_old", "older than 14 days")
            elif position < expired:
                refused[i] = self._rejected("expired", "past the log group's retention")
            elif position >= too_new:
                refused[i] = self._rejected("too_new", "more than 2 hours in the future")
        return refused

    def _rejected(self, kind: str, why: str) -> Rejection:
        metrics.CLOUDWATCH_REJECTED.labels(kind).inc()
        return Rejection(f"cloudwatch rejects events {why}", retryable=False)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
