"""An async client of the capability server (document 000): `await client.classify(texts, capabilities)`.

design: one aiohttp session per client (its connection pool), JSON in and out, as the document's
examples use it; an error reply raises the typed exception binserve reported (binserve.errors, as
request_tools does), carrying its message. Concurrent calls are batched by the server.

    async with ClassifyClient("http://localhost:8000") as client:
        result = await client.classify(texts=["Text 1", "Text 2"],
                                       capabilities=["classification", "recommendations", "alerts"])
"""

from __future__ import annotations

import aiohttp

from binserve.errors import error_from_reply


class ClassifyClient:
    """POST /classify of one server, over one aiohttp session."""

    def __init__(self, base_url: str = "http://localhost:8000", token: str | None = None,
                 timeout_s: float = 120.0) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ClassifyClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def classify(self, texts: list[str] | str, capabilities: list[str] | None = None) -> dict:
        """The server's reply: {"request_id", "results": [{"text", <capability>: ...}], "processing_time"}."""
        body = {"texts": texts, "capabilities": capabilities or ["classification"]}
        async with self._client().post(f"{self.base_url}/classify", json=body) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                err = payload.get("error", {}) if isinstance(payload, dict) else {}
                raise error_from_reply(response.status, err.get("type"), err.get("message", str(payload)), None)
            return payload

    async def stats(self) -> dict:
        async with self._client().get(f"{self.base_url}/stats") as response:
            return await response.json()
