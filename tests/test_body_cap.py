"""TUTORGATE_MAX_BODY: a body over the cap gets 413, however it is sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from kit import SUBJECT, metric, policy_text

CAP = 10_000


async def chunks(total: int, size: int = 4096) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        part = min(size, total - sent)
        sent += part
        yield b"x" * part
        await asyncio.sleep(0)


def student() -> dict[str, str]:
    import uuid
    return {"X-Student-Id": "stu-" + uuid.uuid4().hex[:10], "X-Student-Grade": "5"}


@pytest.mark.parametrize("path", ["/plain/up", SUBJECT])
async def test_chunked_body_over_cap_gets_413(upstream, gateways, http, path):
    """A chunked body over the cap is answered 413 body_too_large (JSON), is not an
    upstream error, and the upstream never receives the whole request."""
    gw = await gateways(policy_text(), upstream.url, max_body=CAP)
    async with http.post(gw.url(path), data=chunks(CAP * 5), headers=student()) as r:
        assert r.status == 413
        assert r.headers["Content-Type"].startswith("application/json")
        body = json.loads(await r.read())
    assert body["rule"] == "body_too_large" and body["retry_after"] is None
    assert metric(gw, "tutorgate_upstream_errors_total") == 0
    await asyncio.sleep(0.2)  # let the upstream notice the cut
    assert not [s for s in upstream.seen if s["path"] == path]


@pytest.mark.parametrize("path", ["/plain/up", SUBJECT])
async def test_declared_body_over_cap_gets_413(upstream, gateways, http, path):
    """A Content-Length over the cap is answered 413 before anything goes upstream."""
    gw = await gateways(policy_text(), upstream.url, max_body=CAP)
    async with http.post(gw.url(path), data=b"x" * (CAP + 1), headers=student()) as r:
        assert r.status == 413
        assert json.loads(await r.read())["rule"] == "body_too_large"
    assert upstream.seen == [] and upstream.broken == 0


@pytest.mark.parametrize("path", ["/plain/up", SUBJECT])
async def test_chunked_body_at_cap_passes(upstream, gateways, http, path):
    """A chunked body of exactly the cap goes through whole."""
    gw = await gateways(policy_text(), upstream.url, max_body=CAP)
    async with http.post(gw.url(path), data=chunks(CAP), headers=student()) as r:
        assert r.status == 200
        assert json.loads(await r.read())["body_length"] == CAP


async def test_chunked_over_cap_on_raw_socket(upstream, gateways):
    """Over a raw socket too: the 413 comes back and the connection ends cleanly."""
    gw = await gateways(policy_text(), upstream.url, max_body=CAP)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /plain/raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        writer.write(b"1000\r\n" + b"y" * 0x1000 + b"\r\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert not [s for s in upstream.seen if s["path"] == "/plain/raw"]
