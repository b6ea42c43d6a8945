"""A client generated from the served document by a real generator (openapi-python-client) drives a
token's whole life against the real server: the document is enough to use the API."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import orjson
import pytest
from openapi_python_client import generate
from openapi_python_client.config import Config, ConfigFile, MetaType

from tests.conftest import MANAGEMENT_TOKEN, UPSTREAM_KEY, Proxy
from tests.control.test_openapi_document import operations, served_document

PACKAGE = "llm_proxy_manage_client"


def _generate(document: dict[str, Any], into: Path) -> None:
    source = into / "openapi.json"
    source.write_bytes(orjson.dumps(document))
    config = Config.from_sources(
        ConfigFile(post_hooks=[]),  # no formatter run: the code is imported, never read
        MetaType.NONE,
        source,
        "utf-8",
        overwrite=True,
        output_path=into / PACKAGE,
    )
    problems = generate(config=config)
    assert not problems, [f"{p.header}: {p.detail}" for p in problems]


@pytest.fixture
def generated_modules() -> Iterator[None]:
    """Forget the generated package afterwards: it lives in this test's tmp_path only."""
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def _api(tag: str, operation_id: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.api.{tag}.{operation_id}")


async def test_a_generated_client_drives_a_token_through_its_life(
    proxy: Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generated_modules: None
) -> None:
    document = await served_document(proxy)
    await asyncio.to_thread(_generate, document, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    client_module = importlib.import_module(f"{PACKAGE}.client")
    models = importlib.import_module(f"{PACKAGE}.models")
    # One module per operation, named by its operationId, under its tag.
    api = {
        operation["operationId"]: _api(operation["tags"][0], operation["operationId"])
        for _, _, operation in operations(document)
    }

    client = client_module.AuthenticatedClient(
        base_url=proxy.base_url, token=MANAGEMENT_TOKEN, raise_on_unexpected_status=True
    )
    async with client:
        created = await api["create_project"].asyncio_detailed(
            client=client, body=models.ProjectCreate(name="generated", api_key=UPSTREAM_KEY)
        )
        assert created.status_code == 201
        project = created.parsed
        assert isinstance(project, models.Project) and project.api_key != UPSTREAM_KEY

        issued = await api["create_token"].asyncio(
            client=client,
            body=models.TokenCreate(
                project_id=str(project.id),
                duration_minutes=30,
                max_requests=10,
                allowed_models=["gpt-4o*"],
                metadata=models.TokenMetadata.from_dict({"team": "search"}),
            ),
        )
        assert isinstance(issued, models.TokenCreated), issued
        assert issued.token.startswith("sk-") and issued.max_requests == 10
        async with proxy.sdk(issued.token) as sdk:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
            )

        token = await api["get_token"].asyncio(client=client, token_id=str(issued.id))
        assert isinstance(token, models.Token), token
        assert (token.status, token.request_count) == (models.TokenStatus.ACTIVE, 1)
        assert token.metadata.to_dict() == {"team": "search"}

        updated = await api["update_token"].asyncio(
            client=client,
            token_id=str(issued.id),
            body=models.TokenUpdate(budget_usd=2.5, rpm=60, max_requests=None),
        )
        assert isinstance(updated, models.Token), updated
        assert (updated.budget_usd, updated.rpm, updated.max_requests) == (2.5, 60, None)

        listed = await api["list_tokens"].asyncio(client=client, project_id=str(project.id))
        assert [t.id for t in listed] == [issued.id] and listed[0].rpm == 60

        revoked = await api["revoke_token_by_value"].asyncio_detailed(
            client=client, body=models.TokenRevoke(token=issued.token)
        )
        assert revoked.status_code == 204
        async with proxy.sdk(issued.token) as sdk:
            with pytest.raises(openai.AuthenticationError) as refused:
                await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
                )
        assert refused.value.code == "token_inactive"
        token = await api["get_token"].asyncio(client=client, token_id=str(issued.id))
        assert (token.status, token.is_active) == (models.TokenStatus.REVOKED, False)

        # Refusals arrive as the document's Error model.
        missing = await api["get_token"].asyncio_detailed(client=client, token_id="nope")
        assert missing.status_code == 404
        assert missing.parsed.error.code == "token_not_found"
        bad = await api["update_token"].asyncio_detailed(
            client=client, token_id=str(issued.id), body=models.TokenUpdate(rpm=0)
        )
        assert bad.status_code == 400 and bad.parsed.error.message.startswith("rpm: ")

        events = await api["list_audit_events"].asyncio(client=client, target_id=str(issued.id))
        actions = [event.action for event in events.events]
        assert actions == ["token.revoke", "token.update", "token.create"]
