from tests.conftest import Proxy


async def test_chat_completion_goes_through_with_a_withering_token(proxy: Proxy) -> None:
    token = await proxy.token()
    response = await proxy.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
