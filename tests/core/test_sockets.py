"""The task sockets' kernel buffers, measured on real tcp:// loopback sockets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import zmq

from imgpipe.core.sockets import SMALL_MESSAGE_BYTES, bound_endpoint, make_socket
from imgpipe.ventilator.service import TASK_OPTIONS as SEND_OPTIONS
from imgpipe.workers.service import TASK_OPTIONS as RECEIVE_OPTIONS
from tests.support import make_settings, recv, wait_for

TASK = os.urandom(1_700_000)  # about one 4K JPEG


def parked(ctx: zmq.Context[Any], settings: Any, send_options: dict[int, int],
           receive_options: dict[int, int]) -> int:
    """Tasks a PUSH (``sndhwm=1``) accepts for a connected PULL (``rcvhwm=1``) that never
    reads: what a busy worker would hold while its peers idle."""
    push = make_socket(ctx, zmq.PUSH, settings, bind="tcp://127.0.0.1:0", sndhwm=1,
                       options=send_options)
    pull = make_socket(ctx, zmq.PULL, settings, connect=bound_endpoint(push), rcvhwm=1,
                       options=receive_options, max_bytes=settings.max_message_bytes)
    try:
        wait_for(lambda: push.poll(100, zmq.POLLOUT), 10, what="the PULL connected")
        count = 0
        while True:
            # Once the PUSH refuses, the kernel and ZeroMQ queues are full; a refusal
            # that lasts a quarter second is the end (the I/O threads had time to move
            # what they could).
            if not push.poll(250, zmq.POLLOUT):
                return count
            push.send(TASK, zmq.NOBLOCK, copy=False)
            count += 1
            assert count < 100, "the PUSH never filled"
    finally:
        pull.close(0)
        push.close(0)


@pytest.mark.timeout(60)
def test_a_worker_that_does_not_read_is_not_handed_a_pile_of_tasks(
        tmp_path: Path, zctx: zmq.Context[Any]) -> None:
    settings = make_settings(tmp_path)
    held = parked(zctx, settings, SEND_OPTIONS, RECEIVE_OPTIONS)
    # One message in each pipe and engine on both sides is the floor (4); the kernel's
    # buffers must not add whole tasks to it, as autotuned ones do (7 to 11 here).
    assert 1 <= held <= 5, held


def test_the_task_buffers_are_set_on_both_ends() -> None:
    assert SEND_OPTIONS[zmq.SNDBUF] >= 16 * 1024  # small buffers cost a syscall per few KB
    assert RECEIVE_OPTIONS[zmq.RCVBUF] == SEND_OPTIONS[zmq.SNDBUF]
    assert RECEIVE_OPTIONS[zmq.IMMEDIATE] == 1


def test_a_message_over_the_size_of_its_role_never_arrives(zctx: Any, tmp_path: Any) -> None:
    """Bus, intake and control sockets take small messages only; image sockets the image
    limit. A peer that sends more is cut off, and the socket goes on with the others."""
    settings = make_settings(tmp_path)
    small = make_socket(zctx, zmq.PULL, settings, bind="tcp://127.0.0.1:0")
    big = make_socket(zctx, zmq.PUSH, settings, connect=bound_endpoint(small))
    big.send(b"x" * (SMALL_MESSAGE_BYTES + 1))
    assert not small.poll(300, zmq.POLLIN)
    ok = make_socket(zctx, zmq.PUSH, settings, connect=bound_endpoint(small))
    ok.send(b"y" * 100)
    assert recv(small) == [b"y" * 100]
    images = make_socket(zctx, zmq.PULL, settings, bind="tcp://127.0.0.1:0",
                         max_bytes=settings.max_message_bytes)
    photo = make_socket(zctx, zmq.PUSH, settings, connect=bound_endpoint(images))
    photo.send(b"z" * (SMALL_MESSAGE_BYTES * 4))
    assert len(recv(images)[0]) == SMALL_MESSAGE_BYTES * 4
    for s in (small, big, ok, images, photo):
        s.close(linger=0)
