"""No token value, upstream key or management token in any log line, whatever happens."""

from __future__ import annotations

import io

from tests.conftest import MANAGEMENT_TOKEN, UPSTREAM_KEY, Proxy


async def test_no_secret_reaches_the_logs(proxy: Proxy, log_stream: io.StringIO) -> None:
    issued = await proxy.issue_token(max_requests=1)
    token = issued["token"]
    headers = {"Authorization": f"Bearer {token}"}
    await proxy.client.get("/v1/models", headers=headers)
    await proxy.client.get("/v1/models", headers=headers)  # quota exceeded
    await proxy.client.get("/v1/audio/drop", headers=headers)
    await proxy.client.get("/v1/models", headers={"Authorization": "Bearer sk-" + "Q" * 43})
    await proxy.manage("DELETE", "/tokens", {"token": token})
    await proxy.client.get("/manage/projects", headers={"Authorization": "Bearer wrong"})
    await proxy.client.close()  # shutdown logs too
    text = log_stream.getvalue()
    assert text, "expected the application to log something"
    for secret in (token, UPSTREAM_KEY, MANAGEMENT_TOKEN, "Q" * 43):
        assert secret not in text
