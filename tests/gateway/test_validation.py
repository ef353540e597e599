"""The bad-input table, in process: every hostile or wrong request gets its status and JSON.

Each case names the DESIGN.md status it must get; every answer must be a JSON object
with ``error`` and ``detail``, and nothing may be recorded in the job store. The same
table runs over real HTTP against gunicorn in ``test_live.py``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from imgpipe.gateway.upload import BodyReader
from tests.gateway import images as im

MB = 1024 * 1024
JOB = "0b7d2a1e-3c4f-4a5b-8c6d-7e8f9a0b1c2d"  # well-formed, unknown


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    build: Callable[[], tuple[str, str, bytes, dict[str, str]]]  # method, path, body, headers
    field: str | None = None


def form(images: list[bytes], ops: list[str | bytes] | None = None, **kw: Any
         ) -> Callable[[], tuple[str, str, bytes, dict[str, str]]]:
    def build() -> tuple[str, str, bytes, dict[str, str]]:
        body, ctype = im.multipart(images, ops or [], **kw)
        return "POST", "/api/process/", body, {"Content-Type": ctype}
    return build


def raw(data: bytes, ops: list[str] | None = None, ctype: str = "image/jpeg"
        ) -> Callable[[], tuple[str, str, bytes, dict[str, str]]]:
    """One image as the body, its chains in ?ops= (percent-encoded)."""
    from urllib.parse import urlencode

    query = "?" + urlencode([("ops", o) for o in ops]) if ops else ""
    return lambda: ("POST", f"/api/process/{query}", data, {"Content-Type": ctype})


def get(path: str) -> Callable[[], tuple[str, str, bytes, dict[str, str]]]:
    return lambda: ("GET", path, b"", {})


GOOD = im.jpeg()
TRUNCATED = GOOD[: len(GOOD) // 2]

CASES = [
    Case("zero-bytes", 415, form([b""]), "image"),
    Case("random-bytes", 415, form([os.urandom(4096)]), "image"),
    Case("truncated-jpeg", 415, form([TRUNCATED]), "image"),
    Case("text-as-png", 415, form([b"hello, I am text"], image_type="image/png"), "image"),
    Case("svg", 415, form([im.SVG], image_type="image/svg+xml"), "image"),
    Case("pdf", 415, form([im.PDF], image_type="application/pdf"), "image"),
    Case("tiff", 415, form([im.TIFF], image_type="image/tiff"), "image"),
    Case("png-header-60000x60000", 413, form([im.png_header_only(60000, 60000)]), "image"),
    Case("png-bomb-20000x20000", 413, form([im.png_bomb(20000)]), "image"),
    Case("output-over-max-pixels", 413,
         form([im.png(8, 8)], ["resize:w=16384,h=16384,fit=fill"]), "ops"),
    Case("job-too-expensive", 413,
         form([im.png(8, 8)] * 16, ["resize:w=7000,h=7000,fit=fill|denoise"] * 16), "ops"),
    Case("second-image-bad", 415, form([GOOD, b"GIF89a-nope"]), "image"),
    Case("unknown-filter", 400, form([GOOD], ["frobnicate:x=1"]), "ops"),
    Case("nan-param", 400, form([GOOD], ["blur:radius=nan"]), "ops"),
    Case("inf-param", 400, form([GOOD], ["brightness:factor=inf"]), "ops"),
    Case("negative-param", 400, form([GOOD], ["blur:radius=-3"]), "ops"),
    Case("huge-param", 400, form([GOOD], ["resize:w=100000000"]), "ops"),
    Case("bad-gravity", 400, form([GOOD], ["crop:w=4,h=4,gravity=middle"]), "ops"),
    Case("gravity-without-cover", 400, form([GOOD], ["resize:w=4,h=4,gravity=smart"]), "ops"),
    Case("malformed-chain", 400, form([GOOD], ["resize:w=|blur:"]), "ops"),
    Case("empty-chain", 400, form([GOOD], [""]), "ops"),
    Case("too-many-filters", 400, form([GOOD], ["|".join(["invert"] * 13)]), "ops"),
    Case("too-many-chains", 400, form([GOOD], ["invert"] * 17), "ops"),
    Case("too-many-images", 400, form([GOOD] * 17), "image"),
    Case("missing-image-part", 400, form([], ["invert"]), "image"),
    Case("non-utf8-ops", 400, form([GOOD], [b"blur:radius=\xff\xfe"]), "ops"),
    Case("unknown-field", 400, form([GOOD], extra=[("imgae", b"x")]), "imgae"),
    Case("json-body", 400, lambda: ("POST", "/api/process/", b'{"image": "x"}',
                                    {"Content-Type": "application/json"}), "Content-Type"),
    Case("no-boundary", 400, lambda: ("POST", "/api/process/", b"--x--",
                                      {"Content-Type": "multipart/form-data"}), "Content-Type"),
    Case("unterminated-multipart", 400, lambda: (
        "POST", "/api/process/", b"--b\r\nContent-Disposition: form-data; name=\"ops\"\r\n\r\nx",
        {"Content-Type": "multipart/form-data; boundary=b"}), "body"),
    Case("raw-zero-bytes", 415, raw(b""), "image"),
    Case("raw-random-bytes", 415, raw(os.urandom(4096)), "image"),
    Case("raw-truncated-jpeg", 415, raw(TRUNCATED), "image"),
    Case("raw-text-declared-png", 415, raw(b"hello, I am text", ctype="image/png"), "image"),
    Case("raw-png-bomb", 413, raw(im.png_bomb(20000), ctype="image/png"), "image"),
    Case("raw-unknown-filter", 400, raw(GOOD, ["frobnicate:x=1"]), "ops"),
    Case("raw-empty-chain", 400, raw(GOOD, [""]), "ops"),
    Case("raw-too-many-chains", 400, raw(GOOD, ["invert"] * 17), "ops"),
    Case("raw-ops-too-long", 400, raw(GOOD, ["invert|" * 700 + "invert"]), "ops"),
    Case("bad-wait", 400, lambda: ("POST", "/api/process/?wait=nan", b"",
                                   {"Content-Type": "multipart/form-data; boundary=b"}), "wait"),
    Case("dotdot-id", 404, get("/api/jobs/..")),
    Case("encoded-dotdot-id", 404, get("/api/jobs/%2e%2e")),
    Case("dotdot-path", 404, get("/api/jobs/../../etc/passwd")),
    Case("dotdot-output", 404, get("/api/jobs/%2e%2e%2f%2e%2e/outputs/0")),
    Case("unknown-job", 404, get(f"/api/jobs/{JOB}"), "id"),
    Case("unknown-job-output", 404, get(f"/api/jobs/{JOB}/outputs/0")),
    Case("non-numeric-output", 404, get(f"/api/jobs/{JOB}/outputs/x"), "n"),
    Case("bad-list-limit", 400, get("/api/jobs?limit=-1"), "limit"),
    Case("unknown-route", 404, get("/nope")),
    Case("wrong-method", 405, get("/api/process/")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_status_and_a_json_error(gateway: Any, case: Case) -> None:
    method, path, body, headers = case.build()
    res = gateway.client.simulate_request(method, path, body=body, headers=headers)
    assert res.status_code == case.status, res.text
    assert res.headers["content-type"].startswith("application/json")
    doc = res.json
    assert isinstance(doc.get("error"), str) and doc["error"]
    assert isinstance(doc.get("detail"), str) and doc["detail"]
    if case.field is not None:
        assert doc.get("field") == case.field, doc
    assert gateway.store.totals().jobs == 0
    assert list((gateway.store.root / "tmp").glob("up-*")) == [], "temp files left behind"


def test_the_table_covers_at_least_25_cases() -> None:
    assert len(CASES) >= 25


class Exploding(io.RawIOBase):
    """A body stream that fails the test if anyone reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        raise AssertionError("the body was read although Content-Length is over the limit")


def test_content_length_over_the_limit_is_refused_before_reading(gateway: Any) -> None:
    res = gateway.client.simulate_request(
        "POST", "/api/process/", headers={
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": str(60 * MB)},
        extras={"wsgi.input": Exploding()})
    assert res.status_code == 413
    assert res.json["field"] == "Content-Length"


def test_an_output_index_out_of_range_is_404(gateway: Any) -> None:
    body, ctype = im.multipart([GOOD], ["invert"])
    job = gateway.post(body, ctype).json
    res = gateway.client.simulate_get(f"/api/jobs/{job['id']}/outputs/1")
    assert res.status_code == 404 and res.json["field"] == "n"
    res = gateway.client.simulate_get(f"/api/jobs/{job['id']}/outputs/0")
    assert res.status_code == 404, "an output that is not done yet does not exist"


def test_a_streamed_body_is_cut_at_the_limit() -> None:
    reader = BodyReader(io.BytesIO(b"x" * 1000), limit=600, timeout_s=5, sock=None)
    got = reader.read(500)
    assert len(got) == 500
    with pytest.raises(Exception) as err:
        while reader.read(64):
            pass
    assert getattr(err.value, "status", None) == 413
    assert reader.count <= 601, "read past the limit"


class Trickle:
    """A body that arrives a few bytes per read, so the end marker spans reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step = data, step

    def read(self, size: int = -1, /) -> bytes:
        chunk, self.data = self.data[:self.step], self.data[self.step:]
        return chunk


@pytest.mark.parametrize("step", [1, 3, 4095, 4097])
def test_the_end_marker_is_found_across_reads(settings: Any, step: int) -> None:
    from imgpipe.core.errors import ImageError
    from imgpipe.core.store import Store
    from imgpipe.gateway.upload import _stage

    store = Store.from_settings(settings)
    good = im.jpeg(64, 48, seed=2)
    staged = _stage(Trickle(good, step), store, settings, index=0)
    assert staged.tmp.read_bytes() == good and staged.nbytes == len(good)
    with pytest.raises(ImageError, match="truncated JPEG"):
        _stage(Trickle(good[:-2], step), store, settings, index=0)
    store.close()


def test_a_body_over_the_limit_without_content_length_is_413(settings: Any,
                                                              make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(max_upload_bytes=20_000))
    body, ctype = im.multipart([im.jpeg(200, 200, seed=3)])
    assert len(body) > 20_000
    res = gw.client.simulate_request(
        "POST", "/api/process/", headers={"Content-Type": ctype},
        extras={"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": ""})
    assert res.status_code == 413, res.text
    assert gw.store.totals().jobs == 0


def test_an_unexpected_exception_is_a_json_500_and_falcon_errors_keep_their_status() -> None:
    import falcon
    from falcon import testing

    from imgpipe.gateway import errors

    class Boom:
        def on_get(self, req: Any, resp: Any) -> None:
            raise RuntimeError("boom")

    class Bad:
        def on_get(self, req: Any, resp: Any) -> None:
            raise falcon.HTTPBadRequest(title="Bad thing", description="because")

    app = falcon.App()
    errors.install(app)
    app.add_route("/boom", Boom())
    app.add_route("/bad", Bad())
    client = testing.TestClient(app)
    res = client.simulate_get("/boom")
    assert res.status_code == 500
    assert res.json == {"error": "internal", "detail": "internal error; see the gateway log"}
    res = client.simulate_get("/bad")
    assert res.status_code == 400 and res.json == {"error": "bad_thing", "detail": "because"}
