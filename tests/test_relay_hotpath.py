"""Hot-path helpers measured in BENCHMARKS.md, held to their behaviour:

* ``relay.connection.release_handshake``: an open socket no longer holds its opening request
  (memory per idle socket), and frame parsing goes on exactly as before, also when the swap must
  not happen (a frame half read);
* ``relay.book_relay.run_eagerly``: a coroutine that never suspends runs to the end at once, one
  that does continues in a tracked task, in order, and cancelling that task cancels it.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from relay.book_relay import run_eagerly
from relay.connection import release_handshake

REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer " + b"t" * 300 + b"\r\n\r\n"
)


def client_frame(payload: bytes, opcode: Opcode = Opcode.TEXT) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


def opened(extra: bytes = b"") -> tuple[ServerProtocol, weakref.ref[Request]]:
    protocol = ServerProtocol()
    protocol.receive_data(REQUEST + extra)
    events = protocol.events_received()
    request = events[0]
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    ref = weakref.ref(request)
    del request, events
    return protocol, ref


def test_the_request_is_released_and_frames_still_parse() -> None:
    protocol, ref = opened()
    gc.collect()
    assert ref() is not None  # held by the parser generator until released
    assert release_handshake(protocol)
    gc.collect()
    assert ref() is None
    frame = client_frame(b"hello")
    protocol.receive_data(frame[:3])  # split reads, as TCP delivers them
    protocol.receive_data(frame[3:] + client_frame(b"again"))
    got = [e.data for e in protocol.events_received() if isinstance(e, Frame)]
    assert got == [b"hello", b"again"]


def test_a_half_read_frame_keeps_the_original_parser() -> None:
    frame = client_frame(b"early")
    protocol, ref = opened(extra=frame[:2])  # a client that did not wait for the 101
    parser = protocol.parser
    assert not release_handshake(protocol)
    assert protocol.parser is parser
    protocol.receive_data(frame[2:])
    assert [e.data for e in protocol.events_received() if isinstance(e, Frame)] == [b"early"]


def test_closing_still_works_after_the_swap() -> None:
    protocol, _ = opened()
    assert release_handshake(protocol)
    protocol.receive_data(client_frame(b"\x03\xe8", Opcode.CLOSE))
    events = protocol.events_received()
    assert [e.opcode for e in events if isinstance(e, Frame)] == [Opcode.CLOSE]
    assert protocol.close_expected()


class FakeState:
    """What run_eagerly needs of RelayState: spawn (tracked tasks)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task


async def test_run_eagerly_without_suspension_needs_no_task() -> None:
    state, steps = FakeState(), []

    async def ready() -> int:  # awaited, but never suspends (like a memory-broker publish)
        return 2

    async def work() -> None:
        steps.append(1)
        steps.append(await ready())

    assert run_eagerly(state, work()) is None  # type: ignore[arg-type]
    assert steps == [1, 2] and state.tasks == []


async def test_run_eagerly_continues_in_a_task_after_a_suspension() -> None:
    state, steps = FakeState(), []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)
        steps.append("after")

    task = run_eagerly(state, work())  # type: ignore[arg-type]
    assert steps == ["before"] and task is not None and state.tasks == [task]
    gate.set_result(7)
    await asyncio.wait_for(task, 5)
    assert steps == ["before", 7, "after"]


async def test_cancelling_the_continuation_cancels_the_coroutine() -> None:
    state, steps = FakeState(), []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise
        finally:
            steps.append("finally")

    task = run_eagerly(state, work())  # type: ignore[arg-type]
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["cancelled", "finally"] and gate.cancelled()
