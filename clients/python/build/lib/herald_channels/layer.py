"""The channel layer: Django Channels' layer API over one Herald WebSocket per event loop.

Every operation is a request on a WebSocket to ``/v1/ws``, in msgpack, matched to its
reply by ``ref``. Receives lease the message they take (``lease`` seconds) and
acknowledge it only when ``receive()`` hands it to its caller, so a receive that is
cancelled (Channels cancels them whenever a consumer stops) loses nothing: a message
that arrives for a cancelled receive waits in a per-channel buffer for the next one,
and one that nobody takes goes back to its channel on the server when its lease runs
out or its connection closes.
"""

import asyncio
import collections
import itertools
import json
import logging
import random
import string
import urllib.error
import urllib.request
from typing import Any, Deque, Dict, List, Optional, Tuple

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

logger = logging.getLogger("herald_channels")

#: Seconds one receive request waits on the server before it is asked again.
RECEIVE_WAIT = 30
#: Receives one connection carries at once (the server allows 64).
MAX_RECEIVES_PER_CONNECTION = 60
#: Backoff between connection attempts, doubling up to the second value.
FIRST_BACKOFF, MAX_BACKOFF = 0.1, 5.0
#: Largest frame read from the server (a message of up to 8 MiB with its envelope).
MAX_FRAME = 1 << 24


class HeraldError(Exception):
    """The server refused an operation; ``code`` is its error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class HeraldUnavailable(HeraldError, ConnectionError):
    """The server cannot be reached, or the connection was lost while an operation that
    is not safe to repeat (a send) was waiting for its answer: it may or may not have
    happened."""

    def __init__(self, message: str):
        super().__init__("unavailable", message)


class _Lost(Exception):
    """The connection ended; ``sent`` tells whether the request had gone out."""

    def __init__(self, sent: bool):
        super().__init__("connection lost")
        self.sent = sent


class _Connection:
    """One WebSocket to the server: requests multiplexed by ``ref``."""

    def __init__(self, layer: "HeraldChannelLayer", websocket):
        self.layer = layer
        self.websocket = websocket
        self.refs = itertools.count(1)
        # ref -> (future, channel of a receive, for its answer if it was cancelled)
        self.pending: Dict[int, Tuple[asyncio.Future, Optional[str]]] = {}
        self.receives = 0
        self.closed = False
        self.reader = asyncio.ensure_future(self._read())

    async def request(self, fields: Dict[str, Any], receive_on: Optional[str] = None):
        ref = next(self.refs)
        future = asyncio.get_running_loop().create_future()
        self.pending[ref] = (future, receive_on)
        if receive_on is not None:
            # Counted until its answer comes, also if its caller stops waiting for it:
            # the server still holds it.
            self.receives += 1
        try:
            await self.websocket.send(msgpack.packb({**fields, "ref": ref}, use_bin_type=True))
        except (WebSocketException, OSError):
            self._end()
            raise _Lost(sent=False)
        return await future

    async def _read(self):
        try:
            async for frame in self.websocket:
                if isinstance(frame, str):
                    continue
                reply = msgpack.unpackb(frame, raw=False, strict_map_key=False)
                if not isinstance(reply, dict):
                    continue
                future, channel = self.pending.pop(reply.get("ref"), (None, None))
                if channel is not None:
                    self.receives -= 1
                if future is not None and not future.done():
                    future.set_result(reply)
                elif channel is not None and reply.get("op") == "message":
                    # Its receive was cancelled: keep the message for the next one.
                    self.layer._keep(channel, reply)
        except (WebSocketException, OSError):
            pass
        finally:
            self._end()

    def _end(self):
        if self.closed:
            return
        self.closed = True
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(_Lost(sent=True))
        self.pending.clear()
        self.receives = 0

    async def close(self):
        self._end()
        await self.websocket.close()
        self.reader.cancel()


class _Pool:
    """The connections of one event loop."""

    def __init__(self):
        self.connections: List[_Connection] = []
        self.opening = asyncio.Lock()
        # Set by close(): requests still running end instead of reconnecting.
        self.closed = False


class HeraldChannelLayer(BaseChannelLayer):
    """Django Channels' channel layer, served by a Herald server.

    ``CONFIG``: ``url`` of the server, ``token`` (sent as ``Authorization: Bearer``),
    ``lease`` (seconds a received message stays leased before it goes back, if its
    receive was cancelled and no other receive takes it), ``connect_timeout`` (seconds
    an operation waits for the server to be reachable). ``capacity``, ``expiry``,
    ``group_expiry`` and ``channel_capacity`` are the server's settings: they are
    accepted, compared with what the server reports, and each one that differs is
    logged as a warning.
    """

    extensions = ["groups", "flush"]

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: Optional[str] = None,
        capacity: Optional[int] = None,
        expiry: Optional[int] = None,
        group_expiry: Optional[int] = None,
        channel_capacity: Optional[dict] = None,
        lease: int = 60,
        connect_timeout: float = 30.0,
        **kwargs,
    ):
        super().__init__(
            expiry=60 if expiry is None else expiry,
            capacity=100 if capacity is None else capacity,
            channel_capacity=channel_capacity,
            **kwargs,
        )
        self.group_expiry = 86400 if group_expiry is None else group_expiry
        self.url = url.rstrip("/")
        self.token = token
        self.lease = int(lease)
        self.connect_timeout = connect_timeout
        self._configured = {
            key: value
            for key, value in (
                ("capacity", capacity),
                ("expiry", expiry),
                ("group_expiry", group_expiry),
                ("channel_capacity", channel_capacity),
            )
            if value is not None
        }
        self._compared = False
        self._pools: Dict[asyncio.AbstractEventLoop, _Pool] = {}
        # channel -> messages handed out to cancelled receives: (reply, ack in flight)
        self._kept: Dict[str, Deque[Tuple[dict, Optional[asyncio.Future]]]] = {}
        # channel -> futures of the receives waiting, resolved when a message is kept
        self._watchers: Dict[str, set] = {}

    # The channel layer API.

    async def send(self, channel: str, message: dict):
        self.require_valid_channel_name(channel)
        assert isinstance(message, dict), "message is not a dict"
        await self._call({"op": "send", "channel": channel, "message": message})

    async def receive(self, channel: str) -> dict:
        self.require_valid_channel_name(channel)
        while True:
            kept = self._kept.get(channel)
            if kept:
                reply, ack = kept.popleft()
            else:
                reply = await self._receive_or_kept(channel)
                if reply is None or reply.get("op") != "message":
                    continue
                ack = None
            if ack is None:
                ack = asyncio.ensure_future(self._ack(channel, reply["id"]))
            try:
                acknowledged = await asyncio.shield(ack)
            except asyncio.CancelledError:
                # Cancelled with the message in hand: the next receive takes it over.
                self._kept.setdefault(channel, collections.deque()).appendleft((reply, ack))
                raise
            if acknowledged:
                return reply["message"]
            # Its lease had ended: it went back to the channel, to be received again.

    async def _receive_or_kept(self, channel: str) -> Optional[dict]:
        """The answer of a receive request, or ``None`` as soon as a message is kept
        for ``channel`` (the answer of an earlier, cancelled receive), whichever comes
        first. A request left waiting keeps its place on the server; its answer, if it
        brings a message, is kept for the next receive."""
        request = asyncio.ensure_future(
            self._call(
                {"op": "receive", "channel": channel, "wait": RECEIVE_WAIT, "lease": self.lease},
                receive_on=channel,
            )
        )
        kept = asyncio.get_running_loop().create_future()
        self._watchers.setdefault(channel, set()).add(kept)
        try:
            await asyncio.wait({request, kept}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._hand_over(channel, request)
            raise
        finally:
            self._watchers.get(channel, set()).discard(kept)
            kept.cancel()
        if request.done():
            return request.result()
        self._hand_over(channel, request)
        return None

    def _hand_over(self, channel: str, request: asyncio.Future):
        """Keeps the message ``request`` brings (now, or when it comes) for the next
        receive of ``channel``: it is never cancelled, as its answer may be a message
        leased already."""
        def keep(done: asyncio.Future):
            if done.cancelled() or done.exception() is not None:
                return
            if done.result().get("op") == "message":
                self._keep(channel, done.result())

        if request.done():
            keep(request)
        else:
            request.add_done_callback(keep)

    async def new_channel(self, prefix: str = "specific.") -> str:
        alphabet = string.ascii_letters + string.digits
        part = lambda: "".join(random.choices(alphabet, k=12))  # noqa: E731
        return f"{prefix}{part()}!{part()}"

    async def group_add(self, group: str, channel: str):
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self._call({"op": "group_add", "group": group, "channel": channel})

    async def group_discard(self, group: str, channel: str):
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self._call({"op": "group_discard", "group": group, "channel": channel})

    async def group_send(self, group: str, message: dict):
        self.require_valid_group_name(group)
        assert isinstance(message, dict), "message is not a dict"
        reply = await self._call({"op": "group_send", "group": group, "message": message})
        full = reply.get("full", 0)
        if full:
            # As channels_redis reports it: full members are skipped, not an error.
            members = full + reply.get("delivered", 0)
            logger.info("%s of %s channels over capacity in group %s", full, members, group)

    async def flush(self):
        self._kept.clear()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._http("POST", "/v1/flush")
        )

    async def close(self):
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            pool.closed = True
            for connection in pool.connections:
                await connection.close()

    # Requests.

    async def _ack(self, channel: str, message_id) -> bool:
        """Acknowledges a leased message: ``False`` when the server no longer holds it
        leased (its lease ended, so it went back). An acknowledgement whose answer was
        lost counts as done: the message is handed out (at least once)."""
        try:
            await self._call({"op": "ack", "channel": channel, "id": message_id}, retry=True)
        except HeraldError as error:
            if error.code == "not_found":
                return False
            raise
        return True

    async def _call(self, fields: dict, receive_on: Optional[str] = None, retry: Optional[bool] = None):
        """Sends a request and returns its reply, raising the server's refusal.

        A request that never left is always tried again on a new connection; one whose
        answer was lost is tried again only when repeating it is safe (everything but
        sends), else it fails with :class:`HeraldUnavailable`.
        """
        op = fields["op"]
        if retry is None:
            retry = op not in ("send", "group_send")
        answer_lost = False
        pool = self._pool()
        while True:
            connection = await self._connection(pool, for_receive=receive_on is not None)
            try:
                reply = await connection.request(fields, receive_on)
            except _Lost as lost:
                if lost.sent and not retry:
                    raise HeraldUnavailable(
                        f"the connection to {self.url} was lost before it answered {op}: "
                        "it may or may not have been done"
                    ) from None
                answer_lost = answer_lost or lost.sent
                continue
            if reply.get("op") == "error":
                code, message = reply.get("code", ""), reply.get("message", "")
                if code == "not_found" and op == "ack" and answer_lost:
                    return reply
                raise _refusal(code, message, fields)
            return reply

    def _pool(self) -> _Pool:
        """The connections of the running event loop (forgetting those of closed loops)."""
        for dead in [loop for loop in self._pools if loop.is_closed()]:
            del self._pools[dead]
        return self._pools.setdefault(asyncio.get_running_loop(), _Pool())

    async def _connection(self, pool: _Pool, for_receive: bool) -> _Connection:
        if pool.closed:
            raise HeraldUnavailable("the layer was closed")
        pool.connections = [c for c in pool.connections if not c.closed]
        for connection in pool.connections:
            if not for_receive or connection.receives < MAX_RECEIVES_PER_CONNECTION:
                return connection
        async with pool.opening:
            pool.connections = [c for c in pool.connections if not c.closed]
            for connection in pool.connections:
                if not for_receive or connection.receives < MAX_RECEIVES_PER_CONNECTION:
                    return connection
            connection = await self._open()
            pool.connections.append(connection)
            return connection

    async def _open(self) -> _Connection:
        """A new connection, trying again with backoff for ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        backoff = FIRST_BACKOFF
        ws_url = "ws" + self.url[len("http"):] + "/v1/ws" if self.url.startswith("http") else self.url
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        while True:
            try:
                websocket = await connect(
                    ws_url,
                    additional_headers=headers,
                    max_size=MAX_FRAME,
                    open_timeout=max(1.0, min(10.0, deadline - loop.time())),
                )
                break
            except (OSError, WebSocketException, asyncio.TimeoutError) as error:
                if loop.time() + backoff > deadline:
                    raise HeraldUnavailable(f"cannot reach {self.url}: {error}") from None
                logger.debug("connecting to %s failed (%s); retrying in %.1f s", self.url, error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        if not self._compared:
            self._compared = True
            await loop.run_in_executor(None, self._compare_settings)
        return _Connection(self, websocket)

    def _keep(self, channel: str, reply: dict):
        self._kept.setdefault(channel, collections.deque()).append((reply, None))
        for watcher in self._watchers.pop(channel, set()):
            if not watcher.done():
                watcher.set_result(None)

    # Plain HTTP, for what the WebSocket protocol does not carry.

    def _http(self, method: str, path: str):
        request = urllib.request.Request(self.url + path, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            try:
                refused = json.loads(error.read())["error"]
            except (ValueError, KeyError, TypeError):
                raise HeraldError("http_error", f"{method} {path}: {error}") from None
            raise _refusal(refused.get("code", ""), refused.get("message", ""), {}) from None
        except OSError as error:
            raise HeraldUnavailable(f"cannot reach {self.url}: {error}") from None
        return json.loads(body) if body else None

    def _compare_settings(self):
        """Logs a warning for each configured layer setting the server does not share."""
        if not self._configured:
            return
        try:
            served = self._http("GET", "/v1/layer") or {}
        except HeraldError as error:
            logger.debug("could not read the server's layer settings: %s", error)
            return
        for key, value in self._configured.items():
            theirs = served.get(key)
            if key == "channel_capacity":
                value = {str(getattr(k, "pattern", k)): v for k, v in value.items()}
            if theirs != value:
                logger.warning(
                    "herald_channels: CONFIG %r is %r but the Herald server at %s uses %r; "
                    "the server's setting applies (set it in the server's [layer] section)",
                    key,
                    value,
                    self.url,
                    theirs,
                )


def _refusal(code: str, message: str, fields: dict) -> Exception:
    """The exception for the server's error ``code``."""
    if code == "channel_full":
        return ChannelFull(fields.get("channel"))
    if code == "invalid_name":
        return TypeError(message)
    if code in ("invalid_message", "invalid_body", "message_too_large"):
        return ValueError(message)
    if code == "unavailable":
        return HeraldUnavailable(message)
    return HeraldError(code, message)
