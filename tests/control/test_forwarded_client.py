"""Behind a load balancer the TCP peer is the balancer: the audit log and the refused sign-ins
name the client that a trusted balancer puts in X-Forwarded-For (FORWARDED_ALLOW_IPS), and only
then, so no client can write its own address in them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from llm_proxy.client_address import ForwardedTrust
from tests.admin_ui.conftest import ADMIN, csrf_token
from tests.conftest import MANAGEMENT_TOKEN, UPSTREAM_KEY, Proxy
from tests.processes import (
    ServerProcess,
    clean_env,
    cli_command,
    run,
    start_server,
    wait_until,
    write_api_config,
)

CLIENT = "203.0.113.7"


async def _audited_client(proxy: Proxy, *forwarded_for: str) -> str | None:
    """The client_ip of the audit entry a project's creation writes, sent with these
    X-Forwarded-For headers over the test's loopback connection (peer 127.0.0.1)."""
    headers = [("Authorization", f"Bearer {MANAGEMENT_TOKEN}")]
    headers += [("X-Forwarded-For", value) for value in forwarded_for]
    async with proxy.client.post(
        "/manage/projects", json={"name": "p", "api_key": UPSTREAM_KEY}, headers=headers
    ) as response:
        assert response.status == 201, await response.text()
        project_id = (await response.json())["id"]
    status, body = await proxy.manage("GET", f"/audit?target_id={project_id}")
    assert status == 200
    (event,) = body["events"]
    client_ip: str | None = event["client_ip"]
    return client_ip


async def _proxy(proxy_factory: Any, allowed: str) -> Proxy:
    started: Proxy = await proxy_factory(forwarded_allow_ips=ForwardedTrust.parse(allowed))
    return started


async def test_the_audit_names_the_client_a_trusted_balancer_forwarded(
    proxy_factory: Any,
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    assert await _audited_client(proxy, CLIENT) == CLIENT


async def test_a_balancer_trusted_by_its_network_is_believed(proxy_factory: Any) -> None:
    proxy = await _proxy(proxy_factory, "10.0.0.0/8, 127.0.0.0/8")
    assert await _audited_client(proxy, CLIENT) == CLIENT


@pytest.mark.parametrize("allowed", ["", "10.0.0.0/8, 192.168.1.1"])
async def test_a_forged_header_from_a_peer_not_trusted_is_ignored(
    proxy_factory: Any, allowed: str
) -> None:
    proxy = await _proxy(proxy_factory, allowed)
    assert await _audited_client(proxy, CLIENT) == "127.0.0.1"


@pytest.mark.parametrize("allowed", ["::ffff:127.0.0.1", "::ffff:127.0.0.0/104"])
async def test_a_balancer_listed_in_its_ipv4_mapped_spelling_is_believed(
    proxy_factory: Any, allowed: str
) -> None:
    """A dual-stack listener shows an IPv4 balancer as ::ffff:a.b.c.d; listed so, it is the same
    host as the IPv4 peer it is."""
    proxy = await _proxy(proxy_factory, allowed)
    assert await _audited_client(proxy, CLIENT) == CLIENT


async def test_a_chain_of_trusted_proxies_is_walked_to_the_first_untrusted_address(
    proxy_factory: Any,
) -> None:
    """A CDN, then an ingress, then the balancer each append what they saw; the left-most entry
    is whatever the client sent, and is not believed."""
    proxy = await _proxy(proxy_factory, "127.0.0.1, 10.0.0.0/8")
    assert await _audited_client(proxy, f"198.51.100.66, {CLIENT}, 10.1.2.3", "10.0.0.9") == CLIENT


async def test_every_peer_trusted_takes_the_address_the_balancer_appended(
    proxy_factory: Any,
) -> None:
    """``*``: the peer is the balancer whoever it is; what the client wrote before the balancer's
    entry is still not believed."""
    proxy = await _proxy(proxy_factory, "*")
    assert await _audited_client(proxy, f"198.51.100.66, {CLIENT}") == CLIENT


@pytest.mark.parametrize(
    "forwarded_for",
    [
        f"{CLIENT}, not-an-address",
        "",
        f"{CLIENT}:port",
        "fe80::1%<b>sk-not-an-interface",  # a scope takes any text: never recorded
    ],
)
async def test_an_entry_on_the_walk_that_is_no_address_makes_the_peer_recorded(
    proxy_factory: Any, forwarded_for: str
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    assert await _audited_client(proxy, forwarded_for) == "127.0.0.1"


@pytest.mark.parametrize(
    ("forwarded_for", "recorded"),
    [
        (f"not-an-address, {CLIENT}", CLIENT),  # the client's own junk, left of the real entry
        (f"{CLIENT}:51234", CLIENT),  # as some cloud balancers write it
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::ffff:203.0.113.7", CLIENT),
    ],
)
async def test_entries_are_read_as_balancers_write_them(
    proxy_factory: Any, forwarded_for: str, recorded: str
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    assert await _audited_client(proxy, forwarded_for) == recorded


async def test_changes_from_the_admin_pages_name_the_forwarded_client(
    proxy_factory: Any,
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    headers = {**ADMIN, "X-Forwarded-For": CLIENT}
    async with proxy.client.get("/admin/projects/new", headers=headers) as page:
        csrf = csrf_token(await page.text())
    form = {"name": "from-the-pages", "api_key": UPSTREAM_KEY, "csrf_token": csrf}
    async with proxy.client.post(
        "/admin/projects", data=form, headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 303, await response.text()
    status, body = await proxy.manage("GET", "/audit?actor=admin")
    assert status == 200
    assert [(e["action"], e["client_ip"]) for e in body["events"]] == [("project.create", CLIENT)]


async def test_a_refused_admin_form_is_logged_with_the_forwarded_client(
    proxy_factory: Any,
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    headers = {**ADMIN, "X-Forwarded-For": CLIENT}
    form = {"name": "forged", "api_key": UPSTREAM_KEY, "csrf_token": "not-a-csrf-token"}
    with structlog.testing.capture_logs() as logs:
        async with proxy.client.post("/admin/projects", data=form, headers=headers) as response:
            assert response.status == 403
    refused = [line for line in logs if line["event"] == "admin.csrf_refused"]
    assert [line["client_ip"] for line in refused] == [CLIENT]


async def test_the_proxy_route_still_drops_the_client_address_headers(
    proxy_factory: Any,
) -> None:
    proxy = await _proxy(proxy_factory, "127.0.0.1")
    token = await proxy.token()
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Forwarded-For": CLIENT,
        "X-Real-IP": CLIENT,
        "Forwarded": f"for={CLIENT}",
    }
    async with proxy.client.get("/v1/models", headers=headers) as response:
        assert response.status == 200
    seen = {name.lower() for name in proxy.upstream.last.headers}
    assert not {"x-forwarded-for", "x-real-ip", "forwarded"} & seen
    assert CLIENT not in json.dumps(dict(proxy.upstream.last.headers))


# -- a real server process: its refused sign-ins in its log, and its start-up -----------------

SERVER_TOKEN = "mgmt-forwarded-test-token"
SERVER_PASSWORD = "forwarded-admin-secret"


def _server(root: Path, listen_host: str = "127.0.0.1", **settings: str) -> ServerProcess:
    """A server process with the management token and admin password of these tests."""
    api_config = write_api_config(root / "api_providers.yaml", "http://127.0.0.1:9")
    return start_server(
        root / "data",
        api_config,
        root / "logs",
        listen_host=listen_host,
        MANAGEMENT_TOKEN=SERVER_TOKEN,
        ADMIN_PASSWORD=SERVER_PASSWORD,
        **settings,
    )


@pytest.fixture(scope="module")
def balanced_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    started = _server(tmp_path_factory.mktemp("balanced"), FORWARDED_ALLOW_IPS="127.0.0.1")
    yield started
    started.stop()


def _refused(url: str, authorization: str, forwarded_for: str) -> None:
    request = urllib.request.Request(
        url, headers={"Authorization": authorization, "X-Forwarded-For": forwarded_for}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    refused.value.close()


def _log_lines(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    lines = (
        json.loads(line) for line in server.process.stderr.splitlines() if line.startswith("{")
    )
    return [line for line in lines if line.get("event") == event]


@pytest.mark.process
@pytest.mark.parametrize(
    ("surface", "path", "authorization"),
    [
        ("management", "/manage/projects", "Bearer wrong-guess"),
        ("admin", "/admin/", "Basic YWRtaW46d3JvbmctZ3Vlc3M="),  # admin:wrong-guess
    ],
)
def test_a_refused_sign_in_names_the_client_behind_the_balancer(
    balanced_server: ServerProcess, surface: str, path: str, authorization: str
) -> None:
    _refused(balanced_server.base_url + path, authorization, f"198.51.100.66, {CLIENT}")

    def warned() -> list[dict[str, Any]]:
        return [
            line
            for line in _log_lines(balanced_server, "auth.credentials_refused")
            if line["surface"] == surface
        ]

    wait_until(lambda: bool(warned()), f"the {surface} warning")
    assert [line["client_ip"] for line in warned()] == [CLIENT]
    assert "wrong-guess" not in balanced_server.process.stderr


@pytest.mark.process
@pytest.mark.parametrize("value", ["balancer.internal", "10.0.0.1/8", "10.0.0.0/33"])
def test_a_bad_forwarded_allow_ips_stops_start_up_in_one_line(tmp_path: Path, value: str) -> None:
    done = run(
        cli_command("server"),
        clean_env(DATA_DIR=str(tmp_path), LISTEN_ADDR="127.0.0.1:0", FORWARDED_ALLOW_IPS=value),
    )
    assert done.returncode == 2
    assert done.stderr.startswith("llm-proxy: FORWARDED_ALLOW_IPS: ")
    assert done.stderr.count("\n") == 1 and value in done.stderr


async def test_a_header_of_thousands_of_trusted_entries_names_the_peer(
    proxy_factory: Any,
) -> None:
    """A host inside the trusted networks (any pod, when the pod network is trusted) may write
    thousands of trusted addresses in the header of a refused sign-in: the walk stops after a
    chain longer than any real one and names the peer, rather than parse every entry while the
    event loop (the proxy path's too) waits; a chain of the longest length walked still names
    its client."""
    proxy = await _proxy(proxy_factory, "127.0.0.0/8")
    thousands = ", ".join(["127.8.8.8"] * 5000)  # within the head's 64 KiB
    assert await _audited_client(proxy, thousands) == "127.0.0.1"
    longest = ", ".join([CLIENT] + ["127.8.8.8"] * 15)
    assert await _audited_client(proxy, longest) == CLIENT


@pytest.mark.process
def test_a_dual_stack_listener_names_an_ipv4_client_as_ipv4(tmp_path: Path) -> None:
    """On ``[::]`` an IPv4 client's peer address is ::ffff:a.b.c.d: recorded as the IPv4 address
    it is, as an X-Forwarded-For entry is, so one client has one spelling in the log."""
    server = _server(tmp_path, listen_host="[::]")
    try:
        _refused(server.base_url + "/manage/projects", "Bearer wrong-guess", CLIENT)
        wait_until(lambda: bool(_log_lines(server, "auth.credentials_refused")), "the warning")
        warned = _log_lines(server, "auth.credentials_refused")
    finally:
        server.stop()
    assert [line["client_ip"] for line in warned] == ["127.0.0.1"]
