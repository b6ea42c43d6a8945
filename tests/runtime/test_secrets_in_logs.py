"""No token value, upstream key or management token in any log line, whatever happens."""

from __future__ import annotations

import base64
import io
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import MANAGEMENT_TOKEN, UPSTREAM_KEY, Proxy
from tests.processes import start_mock_upstream, start_server, write_api_config


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


@pytest.mark.process
def test_configured_secrets_of_any_shape_are_masked_in_a_real_server_s_log(
    tmp_path: Path,
) -> None:
    """Secrets are recognised by their shape (sk-, mgmt-) and, those the server was configured
    with, by their value: here a management token without the mgmt- prefix, an admin password,
    the encryption key and the passwords of REDIS_URL and HTTPS_PROXY, each put in a log line
    by a request whose path holds it (the admin pages log a refused form's path)."""
    key = base64.b64encode(b"\xfb\xff" + secrets.token_bytes(30)).decode()  # holds "+" and "/"
    configured = {
        "MANAGEMENT_TOKEN": "plain-management-" + secrets.token_hex(12),
        "ADMIN_PASSWORD": "admin-" + secrets.token_hex(8),
        "ENCRYPTION_KEY": key,
        "REDIS_URL": f"redis://:redis-{secrets.token_hex(8)}@127.0.0.1:6379/0",
        "HTTPS_PROXY": f"http://egress:proxy-{secrets.token_hex(8)}@127.0.0.1:3128",
    }
    passwords = [
        configured["REDIS_URL"].split(":")[2].partition("@")[0],
        configured["HTTPS_PROXY"].split(":")[2].partition("@")[0],
    ]
    values = [configured["MANAGEMENT_TOKEN"], configured["ADMIN_PASSWORD"], key, *passwords]
    upstream = start_mock_upstream(tmp_path / "mock")
    try:
        api_config = write_api_config(tmp_path / "api.yaml", upstream.base_url)
        server = start_server(
            tmp_path / "data", api_config, tmp_path / "logs", LOG_LEVEL="debug", **configured
        )
        try:
            basic = base64.b64encode(f"admin:{configured['ADMIN_PASSWORD']}".encode()).decode()
            for value in values:
                request = urllib.request.Request(
                    f"{server.base_url}/admin/projects/{quote(value, safe='')}/edit",
                    data=b"name=x",  # no CSRF field
                    headers={"Authorization": f"Basic {basic}"},
                    method="POST",
                )
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=10)
                assert refused.value.code == 403
                refused.value.close()
        finally:
            server.stop()
    finally:
        upstream.process.stop()
    log = server.process.stderr
    assert log.count('"event": "admin.csrf_refused"') == len(values), log
    assert log.count('"path": "/admin/projects/***/edit"') == len(values), log
    for value in values:
        assert value not in log
        assert quote(value, safe="") not in log
