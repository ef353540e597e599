"""``encode:format=auto``: the gateway resolves it from the submitting request's Accept.

The recorded (canonical) chain names a concrete format, so workers never see ``auto``;
with ``?wait``, one output and ``Accept: image/...`` the answer is that image, with
``Vary: Accept``. The sink's part is played by ``EncodingSink``, which runs the real
filter library on each output's recorded chain.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
import zmq
from PIL import Image

from imgpipe.core.config import Settings
from imgpipe.core.protocol import Done, encode_topic
from imgpipe.core.records import task_id
from imgpipe.core.sockets import make_socket
from imgpipe.core.store import Store
from imgpipe.filters import apply_chain, decode, parse_chain
from imgpipe.filters.codec import EncodeParams, encode
from imgpipe.filters.formats import content_type, negotiate, output_format, sniff
from tests.gateway import images as im
from tests.support import wait_for

AVIF_WEBP = "image/avif,image/webp,image/apng,*/*;q=0.8"  # a browser's image Accept


class EncodingSink:
    """Completes the next job's outputs by really running their recorded chains."""

    def __init__(self, zctx: Any, settings: Settings, store: Store) -> None:
        self.pub = make_socket(zctx, zmq.PUB, settings, bind=settings.event_endpoint)
        self.store = store
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        job = wait_for(lambda: self.store.recent_jobs(1), 10, what="a job")[0]
        msgs = []
        for out in job.outputs:
            data = self.store.read_original(job.id, out.image)
            chain = parse_chain(out.ops)
            img = apply_chain(decode(data), chain)
            enc = chain.encode or EncodeParams()
            fmt = output_format(sniff(data), enc.format)
            payload = encode(img, fmt, enc.quality)
            state = self.store.complete(
                task_id(job.id, out.n), payload, worker="w-1", attempt=1,
                width=img.shape[1], height=img.shape[0], content_type=content_type(fmt),
                fmt=fmt, timings={"total": 1.0})
            msgs.append(Done(task_id=out.task_id, job_id=job.id, n=out.n, state="done",
                             job_state=state or ""))
        while not self.stop.wait(0.05):  # PUB drops until the gateway's SUB has joined
            for msg in msgs:
                self.pub.send_multipart(encode_topic(msg))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.close(linger=0)


@pytest.mark.parametrize(
    ("accept", "fmt"),
    [
        ("image/avif,image/webp,*/*", "avif"),
        ("image/webp,image/*;q=0.8", "webp"),
        ("image/avif;q=0, image/webp", "webp"),
        ("image/avif;q=0,image/webp;q=0,image/png", None),
        ("*/*", None),
        ("image/*", None),
        ("application/json", None),
        ("", None),
    ],
)
def test_negotiate(accept: str, fmt: str | None) -> None:
    assert negotiate(accept) == fmt


@pytest.mark.parametrize(
    ("accept", "recorded"),
    [
        (AVIF_WEBP, "resize:w=32|encode:format=avif,quality=70"),
        ("image/webp,*/*;q=0.8", "resize:w=32|encode:format=webp,quality=70"),
        ("application/json", "resize:w=32|encode:quality=70"),
        (None, "resize:w=32|encode:quality=70"),
    ],
)
def test_auto_is_resolved_in_the_recorded_chain(gateway: Any, accept: str | None,
                                                recorded: str) -> None:
    body, ctype = im.multipart([im.jpeg()], ["resize:w=32|encode:format=auto,quality=70"])
    res = gateway.post(body, ctype, headers={"Accept": accept} if accept else None)
    assert res.status_code == 202, res.text
    assert [o["ops"] for o in res.json["outputs"]] == [recorded]
    assert res.headers.get("vary") == "Accept"
    assert gateway.store.job(res.json["id"]).outputs[0].ops == recorded


def test_a_chain_without_auto_does_not_vary(gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["encode:format=webp"])
    res = gateway.post(body, ctype, headers={"Accept": AVIF_WEBP})
    assert res.status_code == 202, res.text
    assert res.json["outputs"][0]["ops"] == "encode:format=webp"
    assert "vary" not in res.headers


@pytest.mark.parametrize(
    ("accept", "ctype_out", "pil_format"),
    [
        (AVIF_WEBP, "image/avif", "AVIF"),
        ("image/webp,image/*;q=0.8", "image/webp", "WEBP"),
        ("image/png,image/*", "image/jpeg", "JPEG"),
    ],
)
def test_wait_answers_the_negotiated_image(gateway: Any, zctx: Any, settings: Settings,
                                           accept: str, ctype_out: str,
                                           pil_format: str) -> None:
    sink = EncodingSink(zctx, settings, gateway.store)
    try:
        body, ctype = im.multipart([im.jpeg()], ["resize:w=32|encode:format=auto"])
        res = gateway.post(body, ctype, params={"wait": "20"}, headers={"Accept": accept})
    finally:
        sink.close()
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == ctype_out
    assert res.headers["vary"] == "Accept"
    with Image.open(io.BytesIO(res.content)) as out:
        assert out.format == pil_format and out.size == (32, 24)


def test_wait_with_an_image_answer_varies_on_accept_without_auto(
        gateway: Any, zctx: Any, settings: Settings) -> None:
    sink = EncodingSink(zctx, settings, gateway.store)
    try:
        body, ctype = im.multipart([im.jpeg()], ["invert"])
        res = gateway.post(body, ctype, params={"wait": "20"}, headers={"Accept": "image/*"})
    finally:
        sink.close()
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/jpeg"
    assert res.headers["vary"] == "Accept"
