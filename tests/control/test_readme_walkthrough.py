"""The README's quick start as a new operator follows it, on a port other than 8080: create a
project, issue a token, call it with the SDK, see it on a chart, revoke it — and never paste the
management token. Real processes, the real SDK, the real admin page."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.request

import openai
import pytest

from tests.control.test_cli_finds_the_server import Site, manage, site, upstream

__all__ = ["site", "upstream"]  # the fixtures, started as `make run` starts the server

pytestmark = pytest.mark.process


def admin_page(site: Site, path: str) -> str:
    password = (site.root / "data" / "admin_password").read_text().strip()
    credentials = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{site.port}{path}", headers={"Authorization": f"Basic {credentials}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def test_the_quick_start_works_as_written_on_another_port(site: Site) -> None:
    assert site.port != 8080
    env = {"LISTEN_ADDR": site.listen_addr}
    # As a script runs it: the key piped in (a terminal is asked for it), never in argv.
    created = manage(
        site.root, "project", "create", "--name", "demo", "--api-key", "-", stdin="sk-real\n", **env
    )
    assert created.returncode == 0, created.stderr
    listed = manage(site.root, "project", "list", **env)
    short = next(line.split()[0] for line in listed.stdout.splitlines() if " demo " in line)
    assert len(short) == 8

    issued = manage(
        site.root,
        "token", "generate", "--project-id", short, "--duration", "60", "--max-requests", "100",
        "--json",
        **env,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)

    proxy = f"http://127.0.0.1:{site.port}"
    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key=token["token"], max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]
    )
    assert reply.choices[0].message.content

    # The token's page charts it (the usage aggregates land shortly after the request).
    for _ in range(100):
        page = admin_page(site, f"/admin/tokens/{token['id']}")
        if re.search(r"<title>[^<]*\b1 request", page):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the request never reached the token's chart")

    revoked = manage(site.root, "token", "revoke", token["id"][:8], "--yes", **env)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Again"}]
        )
    assert refused.value.code == "token_inactive"
