"""A real CloudWatch Logs API for the tests: moto in server mode, with IAM checks on request."""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson
from aiobotocore.session import get_session

REGION = "us-east-1"
# Any credentials pass while moto does not check them (its default).
CREDENTIALS: dict[str, Any] = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def moto_post(moto_url: str, path: str, body: bytes = b"") -> None:
    request = urllib.request.Request(
        f"{moto_url}{path}", data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request):
        pass


def moto_auth(moto_url: str, count: str) -> None:
    """Turn moto's IAM checks on ("0": from the next request on) or off ("inf")."""
    moto_post(moto_url, "/moto-api/reset-auth", count.encode())


async def writer_keys(moto_url: str) -> list[dict[str, str]]:
    """Two access keys of an IAM user allowed to write logs and to delete its own keys."""
    async with get_session().create_client(
        "iam", region_name=REGION, endpoint_url=moto_url, **CREDENTIALS
    ) as iam:
        await iam.create_user(UserName="dispatcher")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["logs:*", "iam:DeleteAccessKey"], "Resource": "*"}
            ],
        }
        await iam.put_user_policy(
            UserName="dispatcher", PolicyName="logs", PolicyDocument=orjson.dumps(policy).decode()
        )
        created = [await iam.create_access_key(UserName="dispatcher") for _ in range(2)]
    return [
        {
            "aws_access_key_id": c["AccessKey"]["AccessKeyId"],
            "aws_secret_access_key": c["AccessKey"]["SecretAccessKey"],
        }
        for c in created
    ]


async def stored(client: Any, group: str = "llm-proxy", stream: str = "events") -> list[Any]:
    answer = await client.get_log_events(
        logGroupName=group, logStreamName=stream, startFromHead=True
    )
    return [orjson.loads(e["message"]) for e in answer["events"]]


async def read_stored(moto_url: str) -> list[Any]:
    """The events in the llm-proxy/events log stream (with moto's checks off)."""
    async with get_session().create_client(
        "logs", region_name=REGION, endpoint_url=moto_url, **CREDENTIALS
    ) as client:
        return await stored(client)
