"""SocketBody: a raw upload read straight off gunicorn's client socket (real sockets,
gunicorn's own body and unreader objects)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from gunicorn.http.body import Body, ChunkedReader, LengthReader
from gunicorn.http.unreader import SocketUnreader
from hypothesis import given, settings
from hypothesis import strategies as st

from imgpipe.gateway.upload import SocketBody


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def send(sock: socket.socket, data: bytes) -> threading.Thread:
    """``data`` sent from a thread: more than a socket buffer holds would block here."""
    t = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    t.start()
    return t


def body_of(sock: socket.socket, length: int, head_read: int) -> tuple[Body, SocketUnreader]:
    """gunicorn's body of a request whose head took ``head_read`` bytes off the socket
    (the parser reads ahead: what it read past the head is in the unreader)."""
    unreader = SocketUnreader(sock)
    unreader.unread(sock.recv(head_read, socket.MSG_WAITALL))
    return Body(LengthReader(unreader, length)), unreader


def read_all(direct: SocketBody, chunk: int) -> bytes:
    out = b""
    while part := direct.read(chunk, time.monotonic() + 10):
        out += bytes(part)
    return out


@pytest.mark.parametrize("head_read", [0, 1000, 70_000])
def test_the_body_and_nothing_past_it(pair: tuple[socket.socket, socket.socket],
                                      head_read: int) -> None:
    a, b = pair
    data = os.urandom(60_000)
    after = b"GET /next HTTP/1.1\r\n\r\n"
    sender = send(a, data + after)
    body, unreader = body_of(b, len(data), head_read)
    direct = SocketBody.take(body, b)
    assert direct is not None
    assert read_all(direct, 16_384) == data
    assert body.reader.length == 0  # gunicorn's count: nothing left to drain
    assert body.read(100) == b""
    # What followed the body is the next request's, in order, whoever read it first.
    assert unreader.read(len(after)) == after
    sender.join(10)


def test_views_are_reused_and_the_counts_kept_in_step(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = os.urandom(300_000)
    sender = send(a, data)
    body, _ = body_of(b, len(data), 0)
    direct = SocketBody.take(body, b)
    assert direct is not None
    first = direct.read(100_000, None)
    assert bytes(first) == data[:100_000]
    assert body.reader.length == len(data) - 100_000
    kept = bytes(first)
    second = direct.read(100_000, None)
    assert second.obj is first.obj  # one buffer for the whole body
    assert bytes(second) == data[100_000:200_000] and kept == data[:100_000]
    # The rest is left to gunicorn's own reader, which still knows how much it is.
    assert body.read(200_000) == data[200_000:]
    sender.join(10)


def test_a_stalled_body_times_out_and_the_connection_is_not_reused(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"x" * 1000)
    body, _ = body_of(b, 5000, 0)
    direct = SocketBody.take(body, b)
    assert direct is not None
    with pytest.raises(TimeoutError):
        direct.read(5000, time.monotonic() + 0.2)
    assert body.failed


def test_anything_but_a_sized_body_on_its_own_socket_keeps_gunicorns_reader(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    unreader = SocketUnreader(b)
    chunked = Body(ChunkedReader(None, unreader))
    assert SocketBody.take(chunked, b) is None
    sized = Body(LengthReader(unreader, 10))
    assert SocketBody.take(sized, a) is None  # another socket than the body's
    assert SocketBody.take(sized, None) is None
    sized.buf.write(b"already")  # the application read part of it through gunicorn
    assert SocketBody.take(sized, b) is None
    assert SocketBody.take(object(), b) is None


@settings(max_examples=60, deadline=None)
@given(body_len=st.integers(0, 200_000), head_read=st.integers(0, 250_000),
       chunk=st.integers(1, 70_000), tail=st.binary(max_size=300))
def test_any_split_of_read_ahead_body_and_what_follows(body_len: int, head_read: int,
                                                       chunk: int, tail: bytes) -> None:
    # However much gunicorn read ahead (none, part of the body, past its end) and
    # whatever size is asked each time: the body's bytes, in order, then nothing; what
    # followed it stays for gunicorn, in order.
    data = bytes(range(256)) * (body_len // 256) + bytes(body_len % 256)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    try:
        sender = send(a, data + tail)
        body, unreader = body_of(b, len(data), min(head_read, len(data) + len(tail)))
        direct = SocketBody.take(body, b)
        assert direct is not None
        assert read_all(direct, chunk) == data
        assert body.reader.length == 0
        if tail:
            assert unreader.read(len(tail)) == tail
        sender.join(10)
    finally:
        a.close()
        b.close()
