"""Endpoint settings that list several peers: parsing, validation, binding the first
free entry, connecting to every entry — on real sockets."""

from __future__ import annotations

import dataclasses
import errno
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.config import Settings, endpoints
from imgpipe.core.control import ask
from imgpipe.core.errors import ConfigError
from imgpipe.core.protocol import Reply, encode
from imgpipe.core.sockets import _ipc_listening, bound_endpoint, make_socket, release
from tests.support import free_port, make_settings, recv, short_dir, wait_for


def test_a_list_is_every_entry_and_one_endpoint_is_still_one() -> None:
    assert endpoints("tcp://a:5553") == ("tcp://a:5553",)
    assert endpoints(" tcp://a:5553 , tcp://b:5553,") == ("tcp://a:5553", "tcp://b:5553")
    assert endpoints("") == ()
    s = Settings.from_env({"IMGPIPE_BUS_ENDPOINT": "tcp://a:5556,tcp://b:5556",
                           "IMGPIPE_DASHBOARD_BUS_ENDPOINT": "tcp://c:5557"}).validate()
    assert s.bus_endpoints == ("tcp://a:5556", "tcp://b:5556", "tcp://c:5557")
    assert Settings().validate().bus_endpoints == ("tcp://127.0.0.1:5556",
                                                   "tcp://127.0.0.1:5557")


@pytest.mark.parametrize("value", ["tcp://a:5553,http://b:5553", "tcp://a:5553,tcp://b",
                                   "tcp://a:5553,,nonsense"])
def test_each_entry_of_a_list_is_validated(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"IMGPIPE_RESULT_ENDPOINT": value}).validate()
    assert err.value.field == "result_endpoint"


def test_two_binders_of_one_tcp_list_take_one_entry_each_and_a_third_is_refused(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    ports = [free_port(), free_port()]
    listed = ",".join(f"tcp://127.0.0.1:{p}" for p in ports)
    settings = make_settings(tmp_path / "data")
    a = make_socket(zctx, zmq.PULL, settings, bind=listed)
    b = make_socket(zctx, zmq.PULL, settings, bind=listed)
    try:
        assert [bound_endpoint(a), bound_endpoint(b)] == [f"tcp://127.0.0.1:{p}" for p in ports]
        with pytest.raises(ConfigError):
            make_socket(zctx, zmq.PULL, settings, bind=listed)
        # A peer given the whole list reaches both.
        push = make_socket(zctx, zmq.PUSH, settings, connect=listed)
        try:
            for i in range(4):
                push.send(b"%d" % i)
            got = {recv(a)[0] for _ in range(2)} | {recv(b)[0] for _ in range(2)}
            assert got == {b"0", b"1", b"2", b"3"}
        finally:
            push.close(0)
    finally:
        a.close(0)
        b.close(0)


def test_an_ipc_entry_in_use_is_skipped_and_free_again_once_released(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    """libzmq would take over an ipc:// socket file another process listens on; the
    entry's lock file says it is held."""
    d = short_dir()
    listed = f"ipc://{d}/a,ipc://{d}/b"
    settings = make_settings(tmp_path / "data")
    a = make_socket(zctx, zmq.PUB, settings, bind=listed)
    b = make_socket(zctx, zmq.PUB, settings, bind=listed)
    assert (bound_endpoint(a), bound_endpoint(b)) == (f"ipc://{d}/a", f"ipc://{d}/b")
    release(a)
    c = make_socket(zctx, zmq.PUB, settings, bind=listed)
    assert bound_endpoint(c) == f"ipc://{d}/a"
    release(b)
    release(c)


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_a_single_endpoint_in_use_is_refused_with_what_to_do(
        tmp_path: Path, zctx: zmq.Context[Any], kind: str) -> None:
    """A second ventilator on an unchanged configuration: refused (EADDRINUSE), not
    silently taking over the first one's ipc:// socket file."""
    one = f"tcp://127.0.0.1:{free_port()}" if kind == "tcp" else f"ipc://{short_dir()}/one"
    settings = make_settings(tmp_path / "data")
    first = make_socket(zctx, zmq.PULL, settings, bind=one)
    try:
        with pytest.raises(zmq.ZMQError) as err:
            make_socket(zctx, zmq.PULL, settings, bind=one)
        assert err.value.errno == errno.EADDRINUSE
    finally:
        first.close(0)


def serve_once(ctx: zmq.Context[Any], settings: Settings, endpoint: str,
               role: str) -> threading.Thread:
    """A ROUTER at ``endpoint`` that answers one request as a ventilator in ``role``."""
    router = make_socket(ctx, zmq.ROUTER, settings, bind=endpoint)

    def answer() -> None:
        try:
            frames = recv(router, 10)
            reply = Reply(ok=True, data={"from": role}, role=role)
            router.send_multipart([*frames[:-1], *encode(reply)])
        finally:
            router.close(0)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def test_ask_takes_the_active_ventilators_answer_and_a_standbys_when_alone(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    d = short_dir()
    a, b, dead = f"ipc://{d}/a", f"ipc://{d}/b", f"ipc://{d}/dead"
    settings = make_settings(tmp_path / "data", control_endpoint=f"{a},{b}")
    threads = [serve_once(zctx, settings, a, "standby"), serve_once(zctx, settings, b, "active")]
    assert ask(zctx, settings, "ping", timeout=5) == {"from": "active"}
    for t in threads:
        t.join(10)
    # libzmq closes a listener in its I/O thread after close() returns: bind a again
    # only once nothing listens there (bind_free refuses a path in use).
    wait_for(lambda: not _ipc_listening(a.removeprefix("ipc://")), 5,
             what="the first standby's listener to close")
    # The active one is gone (nothing listens): the standby's answer, at the deadline.
    alone = dataclasses.replace(settings, control_endpoint=f"{dead},{a}")
    thread = serve_once(zctx, alone, a, "standby")
    assert ask(zctx, alone, "ping", timeout=1) == {"from": "standby"}
    thread.join(10)
