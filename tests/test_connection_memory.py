"""relay.connection.release_handshake: an open socket no longer holds its opening request (memory
per idle socket, bench/micro/README.md), and frame parsing goes on exactly as before, also when
the swap must not happen (a frame half read)."""

from __future__ import annotations

import gc
import weakref

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

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
