"""The asyncio clients: ``InboxClient`` (``/ws``) and ``BookClient`` (``/ws/relay/{book_id}``).

Both wrap a Sans-I/O core (``relay.client.core``) around ``websockets.asyncio.client.connect`` and
keep one stream alive across connections:

* a **supervisor** task connects (``Authorization: Bearer <token from the getter>``, a fresh call
  for every connection), reads frames into the core, and after each disconnect asks the
  ``ReconnectPolicy`` whether and when to reconnect;
* a **pump** task writes what the core wants sent, runs its timers (coalesced acks), and saves due
  checkpoints to the cursor store *before* the acks that follow them;
* a **refresher** task per connection sends ``refresh`` with a new token before the credential's
  ``exp`` (realtime.md "Credential refresh"); if that fails the server closes with 4001 and the
  next connection uses a fresh token anyway.

The application reads deliveries with ``async for`` (or ``run(handler)``). With ``auto_ack`` (the
default) a delivery counts as processed when the loop asks for the next one (or the ``async with``
block ends without an exception); with ``auto_ack=False`` call ``processed(item)``. Deliveries wait
in a bounded queue (``max_queue``): a slow application stops the reader, TCP pushes back, and the
server's slow-consumer close (4008) makes the client reconnect and resume from its cursor.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from relay.client.core import (
    JSON,
    MSGPACK,
    BookProtocol,
    Codec,
    Decision,
    Event,
    FrameError,
    Hello,
    InboxProtocol,
    Message,
    Notice,
    Op,
    Output,
    ReconnectPolicy,
    Reset,
    Settled,
    Synced,
    codec_for,
    refresh_at,
    token_expiry,
)
from relay.client.errors import ClientClosed, ClientError, RequestError, RequestTimeout
from relay.client.store import CursorStore, MemoryCursorStore

log = logging.getLogger("switchboard.client")

TokenGetter = Callable[[], str | Awaitable[str]]
"""Returns the credential for the next connection or refresh (sync or async). Called every time:
never cache an expired token in it."""

NoticeHandler = Callable[[Message], Awaitable[None] | None]
ResetHandler = Callable[[Reset], Awaitable[Any] | Any]

ItemT = TypeVar("ItemT", Event, Op)
CoreT = TypeVar("CoreT", InboxProtocol, BookProtocol)

DEFAULT_MAX_FRAME_BYTES = 1_048_576  # the server's WS_MAX_FRAME_BYTES default


def _ws_base(url: str) -> tuple[str, str, str]:
    """``(scheme, netloc, path)`` of a server URL; http(s) becomes ws(s)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a ws://, wss://, http:// or https:// server URL: {url!r}")
    return scheme, parts.netloc, parts.path.rstrip("/")


def _envelope(body: bytes) -> tuple[str | None, str | None]:
    """``(code, message)`` of a refused upgrade's REST error envelope."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return None, text[:200] or None


class _Client(Generic[CoreT, ItemT]):
    """What both clients share; not public."""

    _core: CoreT

    def __init__(
        self,
        *,
        token: TokenGetter,
        store: CursorStore | None,
        store_key: str,
        msgpack: bool,
        auto_ack: bool,
        max_queue: int,
        on_notice: NoticeHandler | None,
        on_reset: ResetHandler | None,
        refresh: bool,
        refresh_margin_s: float | None,
        policy: ReconnectPolicy | None,
        open_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        max_frame_bytes: int,
    ) -> None:
        if isinstance(token, str) or not callable(token):
            raise TypeError(
                "token must be a function returning the credential (e.g. lambda: TOKEN), "
                "so every reconnect gets a fresh one"
            )
        self._token_getter = token
        self._store: CursorStore = store if store is not None else MemoryCursorStore()
        self._store_key = store_key
        self._codec_pref: Codec = MSGPACK if msgpack else JSON
        self._codec: Codec = self._codec_pref
        self._auto_ack = auto_ack
        self._max_queue = max(1, max_queue)
        self._on_notice = on_notice
        self._on_reset = on_reset
        self._refresh = refresh
        self._refresh_margin_s = refresh_margin_s
        self.policy = policy or ReconnectPolicy()
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_frame_bytes = max_frame_bytes

        self._ws: ClientConnection | None = None
        self._token: str | None = None
        self._futures: dict[str, asyncio.Future[Any]] = {}
        self._items: deque[ItemT | Reset] = deque()
        self._available = asyncio.Event()
        self._space = asyncio.Event()
        self._ready = asyncio.Event()
        self._synced = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop_sleep = asyncio.Event()
        self._end = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._finished = False
        self._failure: ClientError | None = None
        self._last: ItemT | None = None
        self._reconnect_now = False
        self.connections = 0  # sockets opened so far (101 received)

    # -- to be provided by each client -----------------------------------------------------------
    def _make_core(self, position: int | None) -> CoreT:
        raise NotImplementedError

    def _url(self) -> str:
        raise NotImplementedError

    def _position_of(self, item: ItemT) -> int:
        raise NotImplementedError

    def _reset_done(self, reset: Reset, result: Any) -> None:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the saved position and start connecting (returns at once; idempotent)."""
        if self._started:
            return
        self._started = True
        position = await self._store.load(self._store_key)
        self._core = self._make_core(position)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def __aenter__(self) -> _Client[CoreT, ItemT]:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving the block normally means the last delivery was handled; after an exception the
        # application may not have finished it, so it is not acknowledged (it comes again).
        await self.close(processed=exc_type is None)

    async def close(self, *, processed: bool = False) -> None:
        """Close the socket (1000) after acknowledging what was processed; waiting calls raise
        ``ClientClosed``. ``processed``: count the last delivery handed out as processed too."""
        if self._closing:
            if self._supervisor is not None:
                await asyncio.gather(self._supervisor, return_exceptions=True)
            return
        self._closing = True
        self._space.set()  # a reader blocked on a full queue must see the close
        if not self._started:
            self._finish(None)
            return
        if processed and self._last is not None:
            self._mark(self._last)
        self._last = None
        self._core.flush()
        try:
            await self._write()
        except Exception:  # noqa: BLE001 - the socket is going anyway; log, keep closing
            log.debug("final flush failed", exc_info=True)
        self._stop_sleep.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        assert self._supervisor is not None and self._pump_task is not None
        await asyncio.gather(self._supervisor, return_exceptions=True)
        self._pump_task.cancel()
        await asyncio.gather(self._pump_task, return_exceptions=True)
        self._items.clear()
        self._finish(None)

    async def wait_closed(self) -> None:
        """Wait until the client stopped; raises the error that stopped it, if any."""
        await self.start()
        assert self._supervisor is not None
        await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until a socket is open and got its first frame (``hello`` / ``presence``)."""
        await self.start()
        async with asyncio.timeout(timeout):
            while not self._ready.is_set():
                self._raise_if_finished()
                await self._either(self._ready)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the current socket's catch-up is complete (its ``synced`` arrived)."""
        await self.start()
        async with asyncio.timeout(timeout):
            while not self._synced.is_set():
                self._raise_if_finished()
                await self._either(self._synced)

    @property
    def connected(self) -> bool:
        """Whether a socket is open and ready now."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """Whether the client stopped (closed, ended by the server, or failed)."""
        return self._finished

    @property
    def failure(self) -> ClientError | None:
        """The error that stopped the client, if one did."""
        return self._failure

    def _raise_if_finished(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._finished or self._closing:
            raise ClientClosed("the client is closed")

    async def _either(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or the end of the client."""
        finished = asyncio.ensure_future(self._end.wait())
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({finished, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
            waiter.cancel()

    def _finish(self, failure: ClientError | None) -> None:
        if self._finished:
            return
        self._finished = True
        if failure is not None and self._failure is None:
            self._failure = failure
        error: ClientError = self._failure or ClientClosed("the client is closed")
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        self._ready.clear()
        self._available.set()
        self._space.set()
        self._end.set()
        pump = self._pump_task
        if pump is not None and pump is not asyncio.current_task():
            # Nothing more to send; close() still flushes the last checkpoint to the store itself.
            pump.cancel()

    # -- the application's side -----------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        await self.start()
        if self._last is not None and self._auto_ack:
            self._mark(self._last)
        self._last = None
        while True:
            item = await self._get()
            if isinstance(item, Reset):
                await self._handle_reset(item)
                continue
            self._last = item
            return item

    async def run(self, handler: Callable[[ItemT], Awaitable[None] | None]) -> None:
        """Hand every delivery to ``handler`` until the client stops (raises what stopped it)."""
        async for item in self:
            result = handler(item)
            if inspect.isawaitable(result):
                await result

    def processed(self, item: ItemT) -> None:
        """Mark ``item`` (and everything before it) processed: it is acknowledged soon. Needed
        only with ``auto_ack=False``."""
        self._mark(item)

    def _mark(self, item: ItemT) -> None:
        self._core.mark_processed(self._position_of(item), asyncio.get_running_loop().time())
        self._wake.set()

    async def _get(self) -> ItemT | Reset:
        while not self._items:
            if self._finished or self._closing:
                if self._failure is not None:
                    raise self._failure
                raise StopAsyncIteration
            self._available.clear()
            await self._available.wait()
        item = self._items.popleft()
        self._space.set()
        return item

    async def _put(self, item: ItemT | Reset) -> None:
        while len(self._items) >= self._max_queue and not (self._finished or self._closing):
            self._space.clear()
            await self._space.wait()
        self._items.append(item)
        self._available.set()

    async def _handle_reset(self, reset: Reset) -> None:
        result: Any = None
        if self._on_reset is None:
            log.warning(
                "stream reset (%s): state built from earlier deliveries may be incomplete; "
                "pass on_reset to reload it",
                reset.reason,
            )
        else:
            result = self._on_reset(reset)
            if inspect.isawaitable(result):
                result = await result
        self._reset_done(reset, result)
        self._wake.set()

    # -- requests --------------------------------------------------------------------------------
    async def _call(self, request_id: str, timeout: float | None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"no answer to {request_id} within {timeout} s") from None
        finally:
            if self._futures.get(request_id) is future:
                del self._futures[request_id]
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._core.cancel(request_id)

    # -- connections ---------------------------------------------------------------------------
    async def _supervise(self) -> None:
        try:
            while not self._closing:
                decision = await self._connect_once()
                if self._closing:
                    break
                if decision.action == "stop":
                    log.info("the server ended the session")
                    self._finish(None)
                    return
                if decision.action == "fail":
                    log.error("giving up: %s", decision.error)
                    self._finish(decision.error)
                    return
                log.info("reconnecting in %.2f s", decision.delay)
                try:
                    async with asyncio.timeout(decision.delay):
                        await self._stop_sleep.wait()
                except TimeoutError:
                    pass
        except Exception as exc:  # a bug of ours: surface it rather than hang the application
            log.exception("client supervisor failed")
            self._finish(ClientError(f"client failed: {exc!r}"))
            raise
        finally:
            if self._closing:
                self._finish(None)

    async def _get_token(self) -> str:
        token = self._token_getter()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise TypeError(
                f"the token getter returned {type(token).__name__}, not a credential string"
            )
        return token

    async def _connect_once(self) -> Decision:
        try:
            token = await self._get_token()
        except Exception:  # noqa: BLE001 - the getter's own failure (auth server down...): retry
            log.exception("the token getter failed")
            return self.policy.after_error()
        subprotocols = [Subprotocol(self._codec_pref.subprotocol)]
        try:
            ws = await connect(
                self._url(),
                additional_headers={"Authorization": f"Bearer {token}"},
                subprotocols=subprotocols,
                compression=None,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                max_size=None,
                close_timeout=5,
            )
        except InvalidStatus as exc:
            response = exc.response
            code, message = _envelope(bytes(response.body or b""))
            retry_after: float | None
            try:
                retry_after = float(response.headers.get("Retry-After", ""))
            except ValueError:
                retry_after = None
            log.warning("upgrade refused: HTTP %s %s", response.status_code, code or "")
            return self.policy.after_refusal(response.status_code, code, message, retry_after)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info("cannot connect: %s", exc)
            return self.policy.after_error()
        return await self._serve(ws, token)

    async def _serve(self, ws: ClientConnection, token: str) -> Decision:
        core = self._core
        loop = asyncio.get_running_loop()
        self._ws = ws
        self._token = token
        self._codec = codec_for(ws.subprotocol)
        self.connections += 1
        core.connection_made()
        refresher = loop.create_task(self._refresher(ws)) if self._refresh else None
        try:
            async for data in ws:
                try:
                    frame = self._codec.decode(data)
                except FrameError as exc:
                    log.warning("dropped a server frame: %s", exc)
                    continue
                core.receive(frame, loop.time())
                if core.ready and not self._ready.is_set():
                    self.policy.connected()
                    self._ready.set()
                await self._dispatch(core.events_received())
                self._wake.set()
        except ConnectionClosed:
            pass
        finally:
            if refresher is not None:
                refresher.cancel()
            self._ws = None
            self._ready.clear()
            self._synced.clear()
            core.connection_lost()
            await self._dispatch(core.events_received())
        code, reason = ws.close_code, ws.close_reason or ""
        log.info("connection closed: %s %s", code, reason)
        if self._closing:
            return Decision("stop")
        if self._reconnect_now:
            self._reconnect_now = False
            return Decision("reconnect", 0.0)
        return self.policy.after_close(code, reason)

    async def _reconnect(self) -> None:
        """Close the current socket and open a new one at once (a catch-up after a reset)."""
        ws = self._ws
        if ws is not None:
            self._reconnect_now = True
            await ws.close()

    async def _dispatch(self, events: list[Output]) -> None:
        for event in events:
            if isinstance(event, Settled):
                future = self._futures.pop(event.request_id, None)
                if future is None or future.done():
                    continue
                if event.error is not None:
                    future.set_exception(event.error)
                else:
                    future.set_result(event.result)
            elif isinstance(event, Event | Op | Reset):
                await self._put(event)  # type: ignore[arg-type]  # the core yields only ItemT
            elif isinstance(event, Synced):
                self._synced.set()
            elif isinstance(event, Notice):
                await self._notice(event.frame)
            elif isinstance(event, Hello):
                self._on_hello(event)

    def _on_hello(self, hello: Hello) -> None:
        pass

    async def _notice(self, frame: Message) -> None:
        if frame.get("type") == "error":
            log.warning("server error frame: %s %s", frame.get("code"), frame.get("message"))
        if self._on_notice is None:
            return
        try:
            result = self._on_notice(frame)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - the application's callback must not kill the reader
            log.exception("on_notice failed")

    async def _pump(self) -> None:
        """Write what the core queued, run its timers and save due checkpoints, until closed."""
        loop = asyncio.get_running_loop()
        core = self._core
        while True:
            deadline = core.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            core.on_timer(loop.time())
            try:
                await self._write()
            except Exception:  # noqa: BLE001 - a store or socket failure: log, retry next tick
                log.exception("writing to the server or the cursor store failed")
                await asyncio.sleep(0.5)

    async def _write(self) -> None:
        async with self._write_lock:
            checkpoint = self._core.take_checkpoint()
            if checkpoint is not None:
                await self._store.save(self._store_key, checkpoint)  # before the ack that follows
            frames = self._core.frames_to_send()
            ws = self._ws
            if ws is None or not frames:
                return
            codec = self._codec
            try:
                for frame in frames:
                    await ws.send(codec.encode(frame))
            except ConnectionClosed:
                pass  # requests and ops are re-sent on the next socket, acks repeated on hello

    async def _refresher(self, ws: ClientConnection) -> None:
        """Send ``refresh`` before the socket's credential expires, for as long as it lives."""
        token = self._token
        while token is not None:
            at = refresh_at(token, time.time(), margin_s=self._refresh_margin_s)
            exp = token_expiry(token)
            if at is None or exp is None:
                return
            await asyncio.sleep(max(0.0, at - time.time()))
            try:
                fresh = await self._get_token()
            except Exception:  # noqa: BLE001 - try again; at worst 4001 then a reconnect
                log.exception("the token getter failed (refresh)")
                fresh = token
            if fresh == token or (token_expiry(fresh) or exp + 1) <= exp:
                remaining = exp - time.time()
                if remaining <= 0:
                    return  # the server closes with 4001; the next connection asks the getter
                await asyncio.sleep(max(0.25, remaining / 2))
                continue
            rid = self._core.request("refresh", {"token": fresh}, resend=False)
            try:
                await self._call(rid, timeout=10.0)
            except RequestError as exc:
                log.warning("refresh refused: %s", exc)
                remaining = exp - time.time()
                if remaining <= 0:
                    return
                await asyncio.sleep(max(0.25, remaining / 2))
                continue
            except (RequestTimeout, ClientError):
                return
            if ws is self._ws:
                self._token = token = fresh
            else:
                return


class InboxClient(_Client[InboxProtocol, Event]):
    """A ``/ws`` client: the principal's durable inbox, requests and ephemeral frames.

    ::

        async with InboxClient("ws://localhost:8080", token=get_token, device_id="laptop") as inbox:
            reply = await inbox.request("message.send", conversation_id=cid,
                                        body={"kind": "text", "text": "hi"})
            async for event in inbox:            # deduped by cursor, in inbox order
                print(event.event, event.cursor, event.data)

    ``url``: the server (``ws://host:port``; ``http(s)://`` works too; ``/ws`` is added unless the
    path names it). ``token``: a function returning the credential (user access JWT, ``sbt_…`` API
    token with ``subscribe``, ``sbd_…`` daemon key), called for every connection and refresh.
    ``device_id``: this client's stable name (``[A-Za-z0-9_-]{1,64}``): the server keeps its acked
    cursor and retention; without one the socket is a session of its own. ``store``: where the
    last processed cursor is kept (``MemoryCursorStore`` by default). ``filter``: event patterns
    (``["task.*", "publish"]``). ``on_reset``: called when the server cannot replay what was
    missed (reload state over REST; the stream goes on after it returns). ``on_notice``: ephemeral
    frames (``presence``, ``typing``, ``device.online``, ...). ``msgpack``: use
    ``switchboard.v1.msgpack`` instead of JSON. ``ack_delay`` / ``ack_batch``: ack coalescing.
    ``refresh``: refresh the credential on the live socket before ``exp``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenGetter,
        device_id: str | None = None,
        store: CursorStore | None = None,
        filter: Sequence[str] | None = None,
        on_reset: ResetHandler | None = None,
        on_notice: NoticeHandler | None = None,
        msgpack: bool = False,
        auto_ack: bool = True,
        ack_delay: float = 0.2,
        ack_batch: int = 64,
        sync_on_connect: bool | None = None,
        max_queue: int = 1000,
        refresh: bool = True,
        refresh_margin_s: float | None = None,
        policy: ReconnectPolicy | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
    ) -> None:
        scheme, netloc, path = _ws_base(url)
        if not path.endswith("/ws"):
            path += "/ws"
        query = "" if device_id is None else urlencode({"device_id": device_id})
        self._endpoint = urlunsplit((scheme, netloc, path, query, ""))
        parse_uri(self._endpoint)  # InvalidURI now rather than on every reconnect
        self.device_id = device_id
        self._filter = None if filter is None else list(filter)
        self._sync_on_connect = sync_on_connect
        self._ack_delay = ack_delay
        self._ack_batch = ack_batch
        self.hello: Hello | None = None
        super().__init__(
            token=token,
            store=store,
            store_key=f"inbox:{device_id or ''}",
            msgpack=msgpack,
            auto_ack=auto_ack,
            max_queue=max_queue,
            on_notice=on_notice,
            on_reset=on_reset,
            refresh=refresh,
            refresh_margin_s=refresh_margin_s,
            policy=policy,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
        )

    async def __aenter__(self) -> InboxClient:
        await self.start()
        return self

    def _make_core(self, position: int | None) -> InboxProtocol:
        return InboxProtocol(
            cursor=position,
            device_id=self.device_id,
            sync_on_connect=self._sync_on_connect,
            filter=self._filter,
            ack_delay=self._ack_delay,
            ack_batch=self._ack_batch,
        )

    def _url(self) -> str:
        return self._endpoint

    def _position_of(self, item: Event) -> int:
        return item.cursor

    def _reset_done(self, reset: Reset, result: Any) -> None:
        self._core.reset_done(reset, asyncio.get_running_loop().time())

    def _on_hello(self, hello: Hello) -> None:
        self.hello = hello

    @property
    def cursor(self) -> int | None:
        """The highest cursor handed out so far (where a ``sync`` would start)."""
        return None if not self._started else self._core.position

    async def request(self, type: str, *, timeout: float | None = 30.0, **fields: Any) -> Any:
        """Send ``{"type": type, "request_id": …, **fields}`` and return the reply's ``data``.

        Raises ``RequestError(code, message)`` for ``ok: false`` or an ``error`` frame,
        ``RequestTimeout`` after ``timeout`` seconds. Sent as soon as a socket is ready; after a
        reconnect it is sent again with the same ``request_id``, which the server answers with
        its first reply (so a ``message.send`` is not sent twice).
        """
        await self.start()
        self._raise_if_finished()
        rid = self._core.request(type, fields)
        return await self._call(rid, timeout)

    async def send_message(
        self, conversation_id: str, body: dict[str, Any], *, timeout: float | None = 30.0
    ) -> Any:
        """``message.send``: the reply's data (``{"message_id", "seq"}``)."""
        return await self.request(
            "message.send", conversation_id=conversation_id, body=body, timeout=timeout
        )

    async def ping(self, *, timeout: float | None = 30.0) -> Message:
        """A ``ping`` round trip through the server; the ``pong`` frame."""
        pong: Message = await self.request("ping", timeout=timeout)
        return pong

    async def set_filter(self, events: Sequence[str] | None) -> None:
        """Narrow what this device receives (``["task.*", "publish"]``); sent on every connection."""
        await self.start()
        self._filter = None if events is None else list(events)
        self._core.set_filter(self._filter)
        self._wake.set()

    async def sync(self, cursor: int | None = None) -> None:
        """Ask the server to replay everything after ``cursor`` (default: the last one seen)."""
        await self.start()
        self._synced.clear()
        self._core.sync(cursor)
        self._wake.set()


class BookClient(_Client[BookProtocol, Op]):
    """A book relay client for one E2EE device: ops in book order, deduped by seq.

    ::

        async with BookClient("ws://localhost:8080", book_id, token=device_jwt) as book:
            seq = await book.send_op(ciphertext)          # waits for the ack
            async for op in book:                          # the other devices' ops
                apply(op.seq, op.device_id, op.payload)

    ``token``: returns a device JWT (EdDSA, signed by the device key). ``since``: start after this
    seq (default: the store's value; the server replays retained ops after it, and a server
    without catch-up simply ignores it). ``on_reset``: the server no longer has what was missed;
    do a full state exchange with the peers (return None), or load the snapshot (``reset.
    snapshot_seq``) and return its seq: the client then reconnects with ``?since=`` that seq to
    catch up. ``on_notice``: ``presence``, ``device.online`` / ``device.offline``,
    ``pairing.matched``, ``device.removed``. ``max_in_flight``: ops waiting for their ack at once.
    """

    def __init__(
        self,
        url: str,
        book_id: str,
        *,
        token: TokenGetter,
        since: int | None = None,
        store: CursorStore | None = None,
        on_reset: ResetHandler | None = None,
        on_notice: NoticeHandler | None = None,
        msgpack: bool = False,
        auto_ack: bool = True,
        max_in_flight: int = 64,
        max_queue: int = 1000,
        refresh: bool = True,
        refresh_margin_s: float | None = None,
        policy: ReconnectPolicy | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        scheme, netloc, path = _ws_base(url)
        self._base = (scheme, netloc, f"{path}/ws/relay/{quote(book_id, safe='')}")
        parse_uri(urlunsplit((*self._base, "", "")))
        self.book_id = book_id
        self._since = since
        self._max_in_flight = max_in_flight
        self._catch_up: asyncio.Task[None] | None = None
        super().__init__(
            token=token,
            store=store,
            store_key=f"book:{book_id}",
            msgpack=msgpack,
            auto_ack=auto_ack,
            max_queue=max_queue,
            on_notice=on_notice,
            on_reset=on_reset,
            refresh=refresh,
            refresh_margin_s=refresh_margin_s,
            policy=policy,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_frame_bytes=max_frame_bytes,
        )

    async def __aenter__(self) -> BookClient:
        await self.start()
        return self

    def _make_core(self, position: int | None) -> BookProtocol:
        seq = self._since if self._since is not None else position
        return BookProtocol(seq=seq, max_in_flight=self._max_in_flight)

    def _url(self) -> str:
        since = self._core.since
        query = "" if since is None else urlencode({"since": since})
        return urlunsplit((*self._base, query, ""))

    def _position_of(self, item: Op) -> int:
        return item.seq

    def _reset_done(self, reset: Reset, result: Any) -> None:
        covered = result if isinstance(result, int) and not isinstance(result, bool) else None
        if self._core.reset_done(reset, covered, asyncio.get_running_loop().time()):
            self._catch_up = asyncio.get_running_loop().create_task(self._reconnect())

    def _forget(self, request_id: str) -> None:
        self._core.cancel(request_id)
        self._core.cancel_op(request_id)

    @property
    def seq(self) -> int | None:
        """The highest seq received so far (the next connection's ``?since=``)."""
        return None if not self._started else self._core.since

    @property
    def online(self) -> list[str]:
        """Device ids online on this book, as the server last said (``presence`` and changes)."""
        return [] if not self._started else list(self._core.online)

    async def send_op(
        self, payload: bytes, *, id: str | None = None, timeout: float | None = None
    ) -> int:
        """Send one op (``payload``: the ciphertext) and return its seq once the server acked it.

        The op carries ``id`` (generated when None) and is re-sent with it after a reconnect until
        acknowledged; the server acknowledges a re-sent id with its first seq and relays it once.
        Raises ``OpRejected`` when the server refuses it, ``RequestTimeout`` after ``timeout``
        (then the op is no longer re-sent, but it may have been accepted), ``ValueError`` for a
        payload too big for one frame.
        """
        await self.start()
        self._raise_if_finished()
        size = len(payload) if self._codec_pref.binary else 4 * ((len(payload) + 2) // 3)
        if size + 256 > self._max_frame_bytes:
            raise ValueError(
                f"op payload of {len(payload)} bytes does not fit in one "
                f"{self._max_frame_bytes}-byte frame"
            )
        op_id = self._core.send_op(bytes(payload), op_id=id, timestamp=int(time.time()))
        seq: int = await self._call(op_id, timeout)
        return seq

    async def ping(self, *, timeout: float | None = 30.0) -> Message:
        """A ``ping`` round trip through the server; the ``pong`` frame."""
        await self.start()
        self._raise_if_finished()
        rid = self._core.request("ping")
        pong: Message = await self._call(rid, timeout)
        return pong


__all__ = ["BookClient", "InboxClient", "NoticeHandler", "ResetHandler", "TokenGetter"]
