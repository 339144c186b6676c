"""RFC 6455 framing against the real server, with every frame written by hand on a raw socket.

Each input is fed three ways (STYLE.md 13): whole, byte by byte, and followed by trailing data
(a valid ``ping`` message, a close frame and junk) that the server must ignore once it has failed
the connection. Close codes are realtime.md's list ("Heartbeats and close codes"): 1002 protocol
error, 1007 invalid data, 1009 too big. Sections named are RFC 6455's.

Memory is checked with tracemalloc on the in-process server, never with timings.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from shared.codes import CloseCode
from tests.test_ws_handshake import (
    TIMEOUT,
    read_frame,
    read_hello,
    shut,
    stub_authenticator,
    upgrade_request,
)

# A small inbound limit so "too big" inputs stay small; the 100,000-fragment test uses the default.
MAX_BYTES = 4096
MAX_FRAGMENTS = 100  # frames per message (WS_MAX_FRAGMENTS), small for the same reason

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
PING_MESSAGE = b'{"type":"ping"}'
PONG_MESSAGE = {"type": "pong"}


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None) -> bytes:
    """One client frame (5.2). ``length`` declares a payload length other than the real one."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def fragments(opcode: int, data: bytes, size: int) -> bytes:
    """``data`` as one message split into fragments of ``size`` bytes (5.4)."""
    parts = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    out = [frame(opcode if i == 0 else CONT, part, fin=i == len(parts) - 1) for i, part in enumerate(parts)]
    return b"".join(out)


def tiny_fragments(count: int, size: int) -> bytes:
    """One text message of ``count`` fragments of ``size`` bytes, a valid ping once reassembled."""
    prefix, suffix = b'{"type":"ping","pad":"', b'"}'
    body = prefix + b"x" * (count * size - len(prefix) - len(suffix)) + suffix
    return fragments(TEXT, body, size) if size else (
        frame(TEXT, prefix, fin=False) + frame(CONT, b"", fin=False) * (count - 2) + frame(CONT, b'x"}')
    )


@dataclass(frozen=True)
class Case:
    """Bytes a client sends after the handshake, and what the server must do about them."""

    data: bytes
    close: int | None  # the code of the server's close frame; None: the socket stays open
    replies: int = 0  # pong messages expected


PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = (int(CloseCode.PROTOCOL_ERROR), int(CloseCode.INVALID_DATA),
                                         int(CloseCode.TOO_BIG))

CASES: dict[str, Case] = {
    # 5.1: a client MUST mask every frame.
    "unmasked_text": Case(frame(TEXT, PING_MESSAGE, mask=False), PROTOCOL_ERROR),
    "unmasked_ping": Case(frame(PING, b"x", mask=False), PROTOCOL_ERROR),
    # 5.2: reserved bits without a negotiated extension.
    "rsv1": Case(frame(TEXT, PING_MESSAGE, rsv=0b100), PROTOCOL_ERROR),
    "rsv2": Case(frame(TEXT, PING_MESSAGE, rsv=0b010), PROTOCOL_ERROR),
    "rsv3": Case(frame(PING, b"", rsv=0b001), PROTOCOL_ERROR),
    # 5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    "reserved_data_opcode": Case(frame(0x3, b"x"), PROTOCOL_ERROR),
    "reserved_control_opcode": Case(frame(0xB, b"x"), PROTOCOL_ERROR),
    # 5.5: control frames carry at most 125 bytes and are never fragmented.
    "control_over_125": Case(frame(PING, b"x" * 126), PROTOCOL_ERROR),
    "fragmented_ping": Case(frame(PING, b"x", fin=False), PROTOCOL_ERROR),
    # 5.4: a continuation needs a started message; a started message needs continuations.
    "continuation_without_start": Case(frame(CONT, b"x"), PROTOCOL_ERROR),
    "final_continuation_without_start": Case(frame(CONT, PING_MESSAGE), PROTOCOL_ERROR),
    "new_message_inside_fragmented": Case(frame(TEXT, b"{", fin=False) + frame(TEXT, b"}"), PROTOCOL_ERROR),
    "close_inside_fragmented": Case(frame(TEXT, b"{", fin=False) + frame(CLOSE, close_payload(1000)),
                                    PROTOCOL_ERROR),
    # 5.5.1 / 7.4: a close payload is empty or a valid code (+ UTF-8 reason).
    "close_one_byte": Case(frame(CLOSE, b"\x03"), PROTOCOL_ERROR),
    "close_code_1005": Case(frame(CLOSE, close_payload(1005)), PROTOCOL_ERROR),
    "close_code_999": Case(frame(CLOSE, close_payload(999)), PROTOCOL_ERROR),
    "close_invalid_utf8_reason": Case(frame(CLOSE, close_payload(1000, b"\xff\xfe")), INVALID_DATA),
    # 5.2 payload length: declared lengths beyond the limit close before any payload is read, so
    # nothing of that size is ever buffered. 5.2 also requires the 64-bit length's MSB to be 0.
    "declared_just_over_limit": Case(frame(TEXT, b"", length=MAX_BYTES + 1), TOO_BIG),
    "declared_2_62": Case(frame(BINARY, b"", length=1 << 62), TOO_BIG),
    "declared_64bit_msb_set": Case(frame(BINARY, b"", length=(1 << 63) | 5), TOO_BIG),
    "many_fragments_over_limit": Case(fragments(TEXT, b"x" * (MAX_BYTES + 1), 64), TOO_BIG),
    # 8.1: text must be UTF-8, also when a code point or an error spans fragments.
    "invalid_utf8": Case(frame(TEXT, b'{"type":"\xff"}'), INVALID_DATA),
    "overlong_utf8": Case(frame(TEXT, b'{"type":"\xc0\xaf"}'), INVALID_DATA),
    "surrogate_utf8": Case(frame(TEXT, b'{"type":"\xed\xa0\x80"}'), INVALID_DATA),
    "invalid_utf8_split": Case(frame(TEXT, b'{"type":"\xc3', fin=False) + frame(CONT, b'("}'), INVALID_DATA),
    "invalid_utf8_in_first_fragment": Case(frame(TEXT, b'{"\xff', fin=False) + frame(CONT, b'":1}'),
                                           INVALID_DATA),
    # ... and fails at the fragment that breaks it, without waiting for the rest (Autobahn 6.4.1).
    "invalid_utf8_fails_before_the_message_ends": Case(frame(TEXT, b'{"type":"', fin=False)
                                                       + frame(CONT, b'\xed\xa0\x80', fin=False), INVALID_DATA),
    # The contrast: what must keep working. A code point split across fragments, a ping between
    # fragments (5.4: control frames may be interleaved), empty fragments,
    # a message of exactly the limit.
    "valid_utf8_split": Case(
        frame(TEXT, b'{"type":"ping","x":"\xc3', fin=False) + frame(CONT, b'\xa9"}'),
        None, replies=1,
    ),
    "ping_between_fragments": Case(
        frame(TEXT, b'{"type":', fin=False) + frame(PING, b"hb") + frame(CONT, b'"ping"}'),
        None, replies=1,
    ),
    "empty_fragments": Case(
        frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, PING_MESSAGE, fin=False)
        + frame(CONT, b""),
        None, replies=1,
    ),
    "fragments_up_to_the_limit": Case(
        fragments(TEXT, b'{"type":"ping","pad":"' + b"x" * (MAX_BYTES - 40) + b'"}', 97),
        None, replies=1,
    ),
    # WS_MAX_FRAGMENTS: a message split into more frames than that is too big to process (1009),
    # whatever its size in bytes; exactly that many frames is fine.
    "fragments_up_to_the_count_limit": Case(tiny_fragments(MAX_FRAGMENTS, 1), None, replies=1),
    "fragments_over_the_count_limit": Case(tiny_fragments(MAX_FRAGMENTS + 1, 1), TOO_BIG),
    "empty_fragments_over_the_count_limit": Case(tiny_fragments(MAX_FRAGMENTS + 1, 0), TOO_BIG),
    # 1.4 / 5.5.1: after a close frame, the rest of the stream is discarded (no pong below).
    "close_then_trailing": Case(frame(CLOSE, close_payload(1000)) + frame(TEXT, PING_MESSAGE), 1000),
    "close_4001_echoed": Case(frame(CLOSE, close_payload(4001, b"bye")), 4001),
    # Frames before a close or a bad frame are handled as if each had come in a read of its own,
    # also when they share one: the message is answered before the close frame (the pong comes
    # first), and a failure before the client's close is the close code. Autobahn 3.2, 4.1.3,
    # 4.2.3 and 5.15 in particular (a valid message, then a bad frame, in one chunk).
    "message_then_close": Case(frame(TEXT, PING_MESSAGE) + frame(CLOSE, close_payload(1000)), 1000, replies=1),
    "messages_then_close_4001": Case(frame(TEXT, PING_MESSAGE) * 3 + frame(CLOSE, close_payload(4001)), 4001,
                                     replies=3),
    "fragmented_message_then_close": Case(fragments(TEXT, PING_MESSAGE, 4) + frame(CLOSE, close_payload(1000)),
                                          1000, replies=1),
    "message_then_rsv2": Case(frame(TEXT, PING_MESSAGE) + frame(TEXT, PING_MESSAGE, rsv=0b010) + frame(PING, b""),
                              PROTOCOL_ERROR, replies=1),
    "message_then_reserved_data_opcode": Case(frame(TEXT, PING_MESSAGE) + frame(0x3, b"x") + frame(PING, b""),
                                              PROTOCOL_ERROR, replies=1),
    "message_then_reserved_control_opcode": Case(frame(TEXT, PING_MESSAGE) + frame(0xD, b"x") + frame(PING, b""),
                                                 PROTOCOL_ERROR, replies=1),
    "fragmented_message_then_continuation_without_start": Case(
        fragments(TEXT, PING_MESSAGE, 8) + frame(CONT, b"x", fin=False) + frame(TEXT, PING_MESSAGE),
        PROTOCOL_ERROR, replies=1,
    ),
    "invalid_utf8_then_close": Case(frame(TEXT, b'{"type":"\xff"}') + frame(CLOSE, close_payload(1000)),
                                    INVALID_DATA),
    "message_then_invalid_utf8_then_close": Case(
        frame(TEXT, PING_MESSAGE) + frame(TEXT, b'{"type":"\xff"}') + frame(CLOSE, close_payload(1000)),
        INVALID_DATA, replies=1,
    ),
    "too_many_fragments_then_close": Case(tiny_fragments(MAX_FRAGMENTS + 1, 1) + frame(CLOSE, close_payload(1000)),
                                          TOO_BIG),
}

# After the case: a valid message the server must not answer, a close and junk. The close is
# what the server would echo if it had wrongly kept reading.
TRAILING = frame(TEXT, PING_MESSAGE) + frame(CLOSE, close_payload(1000)) + b"\x00junk\xff" * 8


@pytest.fixture
async def server(server_factory: Any, make_settings: Any) -> Any:
    return await server_factory(make_settings(ws_max_frame_bytes=MAX_BYTES, ws_max_fragments=MAX_FRAGMENTS),
                                stub_authenticator)


async def open_socket(server: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection past the handshake and the ``hello`` frame, with Nagle off for bytewise feeds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(upgrade_request("/ws?token=user"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 ")
    await read_hello(reader)
    return reader, writer


async def feed(writer: asyncio.StreamWriter, data: bytes, mode: str) -> None:
    """Write ``data`` whole, byte by byte, or in 64 KB chunks (the client buffers little); writes
    after the server hung up are the client's loss."""
    try:
        if mode == "bytewise":
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)  # let the server read this byte on its own
        elif mode == "chunked":
            for i in range(0, len(data), 65536):
                writer.write(data[i:i + 65536])
                await writer.drain()
        else:
            writer.write(data + (TRAILING if mode == "trailing" else b""))
            await writer.drain()
    except OSError:
        pass


async def outcome(reader: asyncio.StreamReader, answer: asyncio.StreamWriter | None = None,
                  ) -> tuple[list[tuple[int, bytes]], int, bytes]:
    """Frames before the server's close, the close code and reason; then the stream must end.

    ``answer``: echo the server's close frame on it (a close the server started rather than
    failed waits for the client's, up to ``CLOSE_TIMEOUT_S``)."""
    before: list[tuple[int, bytes]] = []
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == CLOSE:
            break
        before.append((opcode, payload))
    if answer is not None:
        await feed(answer, frame(CLOSE, payload), "whole")
    rest = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert rest == b"", f"data after the close frame: {rest[:60]!r}"
    code = struct.unpack("!H", payload[:2])[0] if payload else 1005
    return before, code, payload[2:]


def case_params() -> list[Any]:
    return [pytest.param(name, mode, id=f"{name}-{mode}") for name in sorted(CASES)
            for mode in ("whole", "bytewise", "trailing")]


@pytest.mark.parametrize(("name", "mode"), case_params())
async def test_frame_handling(server: Any, name: str, mode: str) -> None:
    case = CASES[name]
    reader, writer = await open_socket(server)
    await feed(writer, case.data, "whole" if case.close is None and mode == "trailing" else mode)
    if case.close is None:
        # The socket stays open: the replies come, then a client close (followed, in "trailing"
        # mode, by data the server must discard) is echoed with 1000.
        replies = await read_messages(reader, case.replies)
        assert replies == [PONG_MESSAGE] * case.replies
        await feed(writer, frame(CLOSE, close_payload(1000)), mode)
        expected, case_replies = 1000, 0
    else:
        expected, case_replies = case.close, case.replies
    before, code, reason = await outcome(reader)
    await shut(writer)
    assert code == expected, (name, code, reason)
    assert len(reason) <= 123  # 5.5: the whole close payload fits a control frame
    assert [json.loads(p) for op, p in before if op == TEXT] == [PONG_MESSAGE] * case_replies, before
    assert all(op in (TEXT, PONG) for op, _ in before), before  # pongs answer interleaved pings
    await wait_until(lambda: len(server.state.registry) == 0)


async def read_messages(reader: asyncio.StreamReader, count: int, timeout: float = TIMEOUT) -> list[Any]:
    """The next ``count`` text messages, skipping pongs (answers to interleaved pings)."""
    messages: list[Any] = []
    while len(messages) < count:
        opcode, payload = await read_frame(reader, timeout)
        assert opcode in (TEXT, PONG), (opcode, payload)
        if opcode == TEXT:
            messages.append(json.loads(payload))
    return messages


def test_close_codes_are_the_contract_s() -> None:
    """Every code the cases above expect from the server is on realtime.md's list."""
    contract = {1000, 1001, 1002, 1007, 1008, 1009, 1011, 1013, 4001, 4003, 4008, 4029}
    assert {int(c) for c in CloseCode} == contract
    assert {case.close for case in CASES.values()} - {None} <= contract


async def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- 100,000 tiny fragments ----------------------------------------------------------------------

FRAGMENTS = 100_000


async def send_and_close(server: Any, data: bytes) -> list[Any]:
    """Send ``data``, read the one reply, close; the replies seen, once the server let go of it."""
    reader, writer = await open_socket(server)
    await feed(writer, data, "chunked")
    # Generous: 100,000 frames under tracemalloc on a busy machine take seconds (not a speed test).
    replies = await read_messages(reader, 1, timeout=120)
    await feed(writer, frame(CLOSE, close_payload(1000)), "whole")
    before, code, _ = await outcome(reader)
    await shut(writer)
    assert code == 1000 and before == []
    await wait_until(lambda: len(server.state.registry) == 0)
    return replies


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("size", [1, 0], ids=["one_byte", "empty"])
async def test_100k_tiny_fragments_are_delivered_allocation_light_and_leave_no_memory_behind(
    server_factory: Any, make_settings: Any, size: int
) -> None:
    # The bounds raised out of the way (every fragment takes a rate token): this is about
    # reassembly. The next tests are about the bounds.
    settings = make_settings(ws_max_fragments=FRAGMENTS, ws_rate=f"{2 * FRAGMENTS}/1", ws_burst=2 * FRAGMENTS)
    server = await server_factory(settings, stub_authenticator)
    data = tiny_fragments(FRAGMENTS, size)
    await send_and_close(server, data)  # warm-up: first-use allocations are not a leak
    gc.collect()
    rss_before = rss_kib()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        assert await send_and_close(server, data) == [PONG_MESSAGE]
        peak = tracemalloc.get_traced_memory()[1] - baseline
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    # One bytearray holds the 100 KB message (measured peak: about 400 KB, the client's 64 KB
    # writes and the server's reads included). Kept as a list of bytes, the fragments peaked
    # above 12 MB (100,000 objects, and a read's frames all parsed before any was dispatched).
    assert peak < 768 * 1024, f"reassembly peaked at {peak} bytes"
    # Keeping anything (a leaked buffer, a connection never released) would leave it behind.
    assert retained < 512 * 1024, f"{retained} bytes still allocated after the connection closed"
    assert rss_kib() - rss_before < 64 * 1024  # generous: allocator arenas need not shrink


async def test_100k_tiny_fragments_close_1009_at_the_default_fragment_bound(
    server_factory: Any, make_settings: Any
) -> None:
    settings = make_settings()
    # The default bound is below the default burst, so it is the fragment bound that answers
    # (1009: do not resend that message), not the rate limit (4029: pause, resend).
    assert settings.ws_max_fragments <= settings.ws_burst
    server = await server_factory(settings, stub_authenticator)
    data = tiny_fragments(FRAGMENTS, 1)
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        reader, writer = await open_socket(server)
        await feed(writer, data, "chunked")
        before, code, reason = await outcome(reader)
        await shut(writer)
        await wait_until(lambda: len(server.state.registry) == 0)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert (code, reason, before) == (TOO_BIG, b"too many fragments", [])
    assert retained < 512 * 1024, f"{retained} bytes still allocated after the connection closed"


async def test_100k_tiny_fragments_over_the_byte_limit_close_1009(server_factory: Any, make_settings: Any) -> None:
    settings = make_settings(ws_max_frame_bytes=FRAGMENTS // 2, ws_max_fragments=FRAGMENTS,
                             ws_rate=f"{FRAGMENTS}/1", ws_burst=FRAGMENTS)
    server = await server_factory(settings, stub_authenticator)
    reader, writer = await open_socket(server)
    await feed(writer, tiny_fragments(FRAGMENTS, 1), "whole")
    before, code, _ = await outcome(reader)
    await shut(writer)
    assert code == TOO_BIG and before == []
    await wait_until(lambda: len(server.state.registry) == 0)


# -- fragments and the inbound rate budget -------------------------------------------------------


async def test_every_fragment_takes_a_rate_token(server_factory: Any, make_settings: Any) -> None:
    # Three tokens, refilled at one an hour: nothing comes back while the test runs.
    server = await server_factory(make_settings(ws_rate="1/3600", ws_burst=3), stub_authenticator)
    reader, writer = await open_socket(server)
    await feed(writer, fragments(TEXT, PING_MESSAGE, 6), "whole")  # 3 frames: the 3 tokens
    assert await read_messages(reader, 1) == [PONG_MESSAGE]
    # One message of 2 frames, no token left: the first frame gets the error frame and the
    # message is dropped whole (no pong); the second is the flood going on: 4029.
    await feed(writer, fragments(TEXT, PING_MESSAGE, 8), "whole")
    before, code, _ = await outcome(reader, answer=writer)
    await shut(writer)
    assert code == int(CloseCode.RATE_LIMITED)
    assert [json.loads(p)["code"] for op, p in before if op == TEXT] == ["RATE_LIMIT_EXCEEDED"]


# -- answers that would come after the close frame -----------------------------------------------


async def test_a_message_before_the_close_is_dispatched_but_a_late_answer_is_not_written(server: Any) -> None:
    """The handler of a message that shares a read with the client's close runs; an answer that
    needs an await comes after our close frame and is dropped (RFC 6455 5.5.1), never written."""
    answered = asyncio.Event()
    seen: list[Any] = []

    async def slow(conn: Any, message: dict[str, Any]) -> None:
        seen.append(message)
        await asyncio.sleep(0)  # any await: the close frame has been echoed by now
        conn.send({"type": "late"})
        answered.set()

    server.state.handlers["slow"] = slow
    reader, writer = await open_socket(server)
    await feed(writer, frame(TEXT, b'{"type":"slow","n":1}') + frame(CLOSE, close_payload(1000)), "whole")
    before, code, _ = await outcome(reader)  # also: nothing after the close frame
    await asyncio.wait_for(answered.wait(), TIMEOUT)
    await shut(writer)
    assert (code, before, seen) == (1000, [], [{"type": "slow", "n": 1}])
