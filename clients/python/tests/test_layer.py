"""HeraldChannelLayer against a real Herald server: the layer API, types on the wire,
errors, cancellation safety, sync callers and the settings check."""

import asyncio
import logging
import random

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull

from conftest import server_fixture
from herald_server import SUITE_CONFIG
from herald_channels import HeraldChannelLayer

server = server_fixture(SUITE_CONFIG)


@pytest.fixture()
async def layer(server):
    layer = HeraldChannelLayer(url=server.url)
    yield layer
    await layer.flush()
    await layer.close()


@pytest.mark.asyncio
async def test_types_key_order_and_nesting_survive(layer):
    message = {
        "type": "chat.message",
        "int": 2**40,
        "negative": -3,
        "float": 1.5,
        "bytes": b"\x00\xff",
        "text": "héllo",
        "nested": {"z": [1, {"a": None}], "a": True},
    }
    await layer.send("types", message)
    received = await layer.receive("types")
    assert received == message
    assert list(received) == list(message)
    assert list(received["nested"]) == ["z", "a"]


@pytest.mark.asyncio
async def test_a_full_channel_raises_channel_full(layer):
    for n in range(3):
        await layer.send("full", {"type": "t", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send("full", {"type": "t", "n": 3})
    await layer.send("tiny", {"type": "t"})
    with pytest.raises(ChannelFull):
        await layer.send("tiny", {"type": "t"})


@pytest.mark.asyncio
async def test_bad_names_raise_django_type_errors(layer):
    with pytest.raises(TypeError, match="Channel name must be a valid unicode string"):
        await layer.send("bad name", {"type": "t"})
    with pytest.raises(TypeError, match="Group name must be a valid unicode string"):
        await layer.group_add("bad!group", "c")
    with pytest.raises(TypeError):
        await layer.receive("x" * 200)


@pytest.mark.asyncio
async def test_groups_and_new_channels(layer):
    a, b = await layer.new_channel(), await layer.new_channel()
    assert a.startswith("specific.") and "!" in a and a != b
    await layer.group_add("room", a)
    await layer.group_add("room", b)
    await layer.group_send("room", {"type": "chat.message", "n": 1})
    assert await layer.receive(a) == {"type": "chat.message", "n": 1}
    assert await layer.receive(b) == {"type": "chat.message", "n": 1}
    await layer.group_discard("room", b)
    await layer.group_send("room", {"type": "chat.message", "n": 2})
    assert await layer.receive(a) == {"type": "chat.message", "n": 2}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(b), 0.5)


@pytest.mark.asyncio
async def test_flush_empties_channels_and_groups(layer):
    await layer.send("flushed", {"type": "t"})
    await layer.group_add("g", "flushed")
    await layer.flush()
    await layer.group_send("g", {"type": "t"})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("flushed"), 0.5)


@pytest.mark.asyncio
async def test_cancelled_receives_lose_nothing(server):
    # Send a message, start a receive, cancel it 0 to 4 ms later; over and
    # over. Every message must still be received exactly once in the end.
    layer = HeraldChannelLayer(url=server.url)
    sent = 300
    got = []
    for n in range(sent):
        await layer.send("roomy.cancelled", {"type": "t", "n": n})
        receive = asyncio.ensure_future(layer.receive("roomy.cancelled"))
        await asyncio.sleep(random.uniform(0, 0.004))
        receive.cancel()
        try:
            got.append((await receive)["n"])
        except asyncio.CancelledError:
            pass
    while len(got) < sent:
        got.append((await asyncio.wait_for(layer.receive("roomy.cancelled"), 5))["n"])
    assert sorted(got) == list(range(sent))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("roomy.cancelled"), 0.5)
    await layer.close()


def test_sync_code_uses_the_layer_through_async_to_sync(server):
    layer = HeraldChannelLayer(url=server.url)
    for n in range(3):
        async_to_sync(layer.group_add)("sync.group", f"sync.{n}")
    async_to_sync(layer.group_send)("sync.group", {"type": "chat.message", "message": "Hello, world!"})
    for n in range(3):
        assert async_to_sync(layer.receive)(f"sync.{n}") == {
            "type": "chat.message",
            "message": "Hello, world!",
        }


@pytest.mark.asyncio
async def test_settings_that_differ_from_the_servers_are_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="herald_channels")
    layer = HeraldChannelLayer(url=server.url, capacity=3, expiry=5)
    await layer.send("settings", {"type": "t"})
    await layer.receive("settings")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'expiry'" in warned and "'capacity'" not in warned, warned
    await layer.close()


@pytest.mark.asyncio
async def test_an_unreachable_server_fails_clearly():
    from herald_channels import HeraldUnavailable

    layer = HeraldChannelLayer(url="http://127.0.0.1:9", connect_timeout=0.5)
    with pytest.raises(HeraldUnavailable, match="cannot reach"):
        await layer.send("c", {"type": "t"})
