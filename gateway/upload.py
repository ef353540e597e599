"""``POST /api/process/`` bodies: stream, bound and validate an upload.

Two forms: multipart (``image`` parts, ``ops`` fields: several images and chains), or
one image as the raw body (``Content-Type: image/*`` or ``application/octet-stream``)
with its chains in ``?ops=`` (repeated for several), which skips the multipart framing.

The body is never held in memory whole: each ``image`` part is copied in 1 MiB chunks
(smaller reads made gunicorn's reader copy its read-ahead again and again) to
a temp file under ``store.tmp_dir()`` (same filesystem as the originals, so adopting
it is a rename). Limits apply in the order that makes a bad request cheapest:

1. ``Content-Length`` over ``max_upload_bytes`` -> 413 before a byte is read; a
   chunked body is counted while it streams and cut at the same limit;
2. the whole body must arrive within ``gateway_timeout_s`` (each socket read is
   bounded by what is left), so a stalled or trickling client is cut with 408;
3. part counts (``max_images``, ``max_chains``) as the parts arrive;
4. per image: format from its magic bytes and pixel count from its header
   (``filters.codec.probe``), before anything decodes it -> 415 / 413; a JPEG or PNG
   whose end marker is missing (truncated) -> 415;
5. every ``ops`` chain parsed and range-checked (``filters.parse_chain``) -> 400.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import falcon
from falcon.media.multipart import MultipartForm, MultipartParseError, MultipartParseOptions
from falcon.util.reader import BufferedReader
from gunicorn.http.body import LengthReader
from gunicorn.http.unreader import SocketUnreader

from imgpipe.core.config import Settings
from imgpipe.core.errors import FilterError, ImageError
from imgpipe.core.store import Store
from imgpipe.filters import parse_chain, sniff
from imgpipe.filters.chain import Chain
from imgpipe.filters.codec import check_pixels, probe
from imgpipe.filters.formats import AUTO, negotiate
from imgpipe.gateway.errors import BadForm, ClientTimeout, PayloadTooLarge, RequestTimeout
from imgpipe.gateway.presets import expand, load_presets

CHUNK = 1024 * 1024


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes | memoryview: ...


HEAD = 256 * 1024          # bytes kept to probe a header (EXIF/ICC can push SOF far)
TAIL = 4096                # bytes read back to check an image's end marker
MAX_OPS_BYTES = 4096       # one chain spec, UTF-8
END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND", "gif": b"\x3b"}
DEFAULT_CHAINS = ("resize:w=1920", "blur:radius=3", "brightness:factor=1.2")


@dataclass
class StagedImage:
    """One uploaded image, written to a temp file and probed."""

    tmp: Path
    format: str
    width: int
    height: int
    nbytes: int
    sha256: str = ""  # of the bytes: the result cache's key


@dataclass
class Upload:
    """A validated upload: images on disk and parsed chains ``(canonical, cost)``."""

    images: list[StagedImage] = field(default_factory=list)
    chains: list[tuple[str, str]] = field(default_factory=list)
    body_bytes: int = 0
    negotiated: bool = False  # a chain's format=auto was resolved from Accept

    @property
    def outputs(self) -> int:
        return len(self.images) * len(self.chains)

    def discard(self) -> None:
        """Remove temp files that were not adopted (errors, backpressure)."""
        for img in self.images:
            img.tmp.unlink(missing_ok=True)


class SocketBody:
    """A ``Content-Length`` body read straight off gunicorn's client socket.

    gunicorn's own reader passes every received chunk through three ``BytesIO``
    buffers and as many slices (~0.4 ms of CPU per MB of upload here, against ~0.2 ms
    for the socket reads themselves). This takes what gunicorn has already read ahead,
    then ``recv_into`` one buffer it reuses, and keeps gunicorn's count of the body's
    remaining bytes in step, so keep-alive and the drain of an unread rest still work.
    A chunk returned by :meth:`read` is a view, valid until the next call.
    """

    def __init__(self, stream: Any, reader: Any, sock: socket.socket, ahead: bytes) -> None:
        self.stream = stream
        self.reader = reader
        self.sock = sock
        self.ahead = ahead
        self.buf = bytearray()

    @classmethod
    def take(cls, stream: Any, sock: socket.socket | None) -> SocketBody | None:
        """The direct reader of ``stream`` (gunicorn's ``wsgi.input``), or None when it
        is anything else: a chunked body, another server, bytes already consumed."""
        reader = getattr(stream, "reader", None)
        unreader = getattr(reader, "unreader", None)
        buffered = getattr(stream, "buf", None)
        if (sock is None or not isinstance(reader, LengthReader)
                or not isinstance(unreader, SocketUnreader) or unreader.sock is not sock
                or buffered is None or buffered.tell()):
            return None
        ahead = unreader.take_buffered()
        if len(ahead) > reader.length:  # the next request, pipelined: gunicorn's again
            unreader.unread(ahead[reader.length:])
            ahead = ahead[:reader.length]
        reader.length -= len(ahead)
        return cls(stream, reader, sock, ahead)

    def read(self, size: int, deadline: float | None) -> memoryview:
        """Up to ``size`` bytes (fewer only at the body's end or when the client closes);
        with ``deadline``, each socket read waits at most until then."""
        if self.ahead:
            data, self.ahead = self.ahead[:size], self.ahead[size:]
            return memoryview(data)
        size = min(size, self.reader.length)
        if len(self.buf) < size:
            self.buf = bytearray(size)
        view = memoryview(self.buf)[:size]
        got = 0
        try:
            while got < size:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("the body's deadline passed")
                    self.sock.settimeout(left)
                n = self.sock.recv_into(view[got:], size - got)
                if n == 0:
                    break
                got += n
                self.reader.length -= n
        except BaseException:
            self.stream.failed = True  # where the next request starts is unknown now
            raise
        return view[:got]


class BodyReader:
    """The raw body with a byte limit and a deadline, read through the client socket.

    Under gunicorn ``environ['gunicorn.socket']`` is the client socket: before each
    read its timeout is set to the time left, so a stalled client raises instead of
    holding the thread. Elsewhere (in-process tests) only the byte limit applies.
    """

    def __init__(self, raw: Any, *, limit: int, timeout_s: float,
                 sock: socket.socket | None, direct: SocketBody | None = None,
                 length: int | None = None) -> None:
        self.raw = raw
        self.direct = direct
        self.length = length  # the declared Content-Length (None: chunked)
        self.limit = limit
        self.count = 0
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.sock = sock
        self.sock_timeout = sock.gettimeout() if sock is not None else None

    def restore(self) -> None:
        """Give the socket back its own timeout (the answer still has to be written)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.settimeout(self.sock_timeout)

    def read(self, size: int = -1) -> bytes | memoryview:
        size = CHUNK if size is None or size < 0 else size
        if self.sock is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._late()
            if self.direct is None:  # a SocketBody sets it before each of its reads
                self.sock.settimeout(left)
        want = min(size, self.limit + 1 - self.count)
        try:
            data: bytes | memoryview = (self.raw.read(want) if self.direct is None
                                        else self.direct.read(want, self.deadline))
        except (TimeoutError, ClientTimeout):
            raise self._late() from None
        except OSError as exc:  # the client went away mid-body
            raise BadForm(f"the request body was cut short ({exc})", field="body") from None
        if not data and size and self.length is not None and self.count < self.length:
            # The client closed before its declared length: an incomplete message, not
            # a shorter upload (the image may even look whole: refused all the same).
            raise BadForm(f"the request body was cut short: {self.count} of the "
                          f"{self.length} bytes declared arrived", field="body")
        self.count += len(data)
        if self.count > self.limit:
            raise PayloadTooLarge(f"the body is over the upload limit of {self.limit} bytes",
                                  field="body")
        return data

    def _late(self) -> RequestTimeout:
        return RequestTimeout(f"the body did not arrive within {self.timeout_s:g} s "
                              f"({self.count} bytes received)", field="body")


def check_length(req: falcon.Request, settings: Settings) -> int | None:
    """413 on a declared length over the limit, before the body is touched."""
    length = req.content_length
    if length is not None and length > settings.max_upload_bytes:
        raise PayloadTooLarge(f"Content-Length {length} is over the upload limit of "
                              f"{settings.max_upload_bytes} bytes", field="Content-Length")
    return length


def parse_upload(req: falcon.Request, settings: Settings, store: Store, *,
                 digest: bool = True) -> Upload:
    """The validated upload in ``req``; raises an ImgpipeError with its status on anything bad.

    ``digest``: hash each image for the result cache (a job that bypasses the cache
    leaves ``sha256`` empty and spends no CPU on it). On error every temp file written
    so far is removed.
    """
    length = check_length(req, settings)
    ctype = req.content_type or ""
    media, _, params = ctype.partition(";")
    media = media.strip().lower()
    raw = media.startswith("image/") or media == "application/octet-stream"
    if media != "multipart/form-data" and not raw:
        raise BadForm("send multipart/form-data with one or more 'image' file parts and "
                      "optional 'ops' fields, or one image as the body (Content-Type "
                      f"image/*) with ?ops= (got {media or 'no Content-Type'!r})",
                      field="Content-Type")
    limit = settings.max_upload_bytes if length is None else length
    sock = req.env.get("gunicorn.socket")
    body = BodyReader(req.stream, limit=limit, timeout_s=settings.gateway_timeout_s,
                      sock=sock, direct=SocketBody.take(req.stream, sock) if raw else None,
                      length=length)
    if raw:
        return _parse_raw(req, body, settings, store, digest=digest)
    boundary = _boundary(params)
    options = MultipartParseOptions()
    options.max_body_part_count = settings.max_images + settings.max_chains + 4
    # bytes(): the reader returns bytes here (views only come from a raw SocketBody)
    form = MultipartForm(BufferedReader(lambda n: bytes(body.read(n)), limit + 1, CHUNK),
                         boundary, length, options)
    upload = Upload()
    specs: list[str] = []
    with _cleanup(upload, body):
        for part in form:
            name = part.name
            if name == "image":
                if len(upload.images) >= settings.max_images:
                    raise BadForm(f"at most {settings.max_images} images per job",
                                  field="image")
                upload.images.append(_stage(part.stream, store, settings,
                                            index=len(upload.images), digest=digest))
            elif name == "ops":
                if len(specs) >= settings.max_chains:
                    raise FilterError(f"at most {settings.max_chains} ops chains per job",
                                      field="ops")
                specs.append(_text(part.stream, "ops"))
            else:
                raise BadForm(f"unknown form field {name!r}: use 'image' and 'ops'",
                              field=str(name))
        # Reach the closing boundary so a truncated body is an error, not a short job.
        upload.body_bytes = body.count
        if not upload.images:
            raise BadForm("no 'image' part: send the images as file parts named 'image'",
                          field="image")
        upload.chains, upload.negotiated = parse_chains(
            specs or list(DEFAULT_CHAINS), settings, accept=req.get_header("Accept"))
    return upload


@contextlib.contextmanager
def _cleanup(upload: Upload, body: BodyReader) -> Iterator[None]:
    """On any error the staged files go; either way the socket gets its timeout back."""
    try:
        yield
    except MultipartParseError as exc:
        upload.discard()
        raise BadForm(f"malformed multipart body: {exc.description}", field="body") from None
    except BaseException:
        upload.discard()
        raise
    finally:
        body.restore()


def _parse_raw(req: falcon.Request, body: BodyReader, settings: Settings,
               store: Store, *, digest: bool = True) -> Upload:
    """One image as the whole body (``Content-Type: image/*``), its chains in ``?ops=``
    (repeated for several): no multipart framing to scan. The format still comes from
    the bytes, never from the declared type."""
    upload = Upload()
    with _cleanup(upload, body):
        specs = _query_values(req, "ops")
        if len(specs) > settings.max_chains:
            raise FilterError(f"at most {settings.max_chains} ops chains per job", field="ops")
        for spec in specs:
            if len(spec.encode()) > MAX_OPS_BYTES:
                raise BadForm(f"'ops' is longer than {MAX_OPS_BYTES} bytes", field="ops")
        upload.images.append(_stage(body, store, settings, index=0, digest=digest))
        upload.body_bytes = body.count
        upload.chains, upload.negotiated = parse_chains(
            [x.strip() for x in specs] or list(DEFAULT_CHAINS), settings,
            accept=req.get_header("Accept"))
    return upload


def _query_values(req: falcon.Request, name: str) -> list[str]:
    """Every value of a query parameter, repeated or not (no splitting on commas: a
    chain has commas of its own)."""
    value = req.params.get(name)
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def parse_chains(specs: list[str], settings: Settings, *,
                 accept: str | None = None) -> tuple[list[tuple[str, str]], bool]:
    """``(canonical, cost)`` per spec, and whether any ``format=auto`` was resolved;
    FilterError naming the chain that is wrong.

    A ``preset:NAME`` spec is first replaced by its chain (``IMGPIPE_PRESETS``).
    ``encode:format=auto`` becomes the format ``accept`` (the request's ``Accept``)
    allows, or the input's, so the recorded chain and the workers never see ``auto``.
    """
    out: list[tuple[str, str]] = []
    negotiated = False
    presets = load_presets(settings.presets)
    for i, spec in enumerate(specs):
        try:
            chain = parse_chain(expand(spec, presets), max_filters=settings.max_filters)
        except FilterError as exc:
            where = f" ({exc.field})" if exc.field and exc.field != "ops" else ""
            raise FilterError(f"ops #{i + 1} {spec[:200]!r}: {exc.detail}{where}",
                              field="ops") from None
        if chain.encode is not None and chain.encode.format == AUTO:
            chain, negotiated = _resolve_auto(chain, negotiate(accept)), True
        out.append((chain.canonical(), chain.cost))
    return out, negotiated


def _resolve_auto(chain: Chain, fmt: str | None) -> Chain:
    assert chain.encode is not None
    return dataclasses.replace(chain, encode=dataclasses.replace(chain.encode, format=fmt))


def _boundary(params: str) -> bytes:
    for item in params.split(";"):
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            value = value.strip().strip('"').rstrip()
            if 1 <= len(value) <= 70:
                try:
                    return value.encode("ascii")
                except UnicodeEncodeError:
                    break
    raise BadForm("multipart/form-data needs a boundary of 1 to 70 ASCII characters",
                  field="Content-Type")


def _text(stream: Readable, name: str) -> str:
    raw = stream.read(MAX_OPS_BYTES + 1)
    if len(raw) > MAX_OPS_BYTES:
        raise BadForm(f"{name!r} is longer than {MAX_OPS_BYTES} bytes", field=name)
    try:
        return bytes(raw).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadForm(f"{name!r} is not UTF-8 text", field=name) from None


def _stage(stream: Readable, store: Store, settings: Settings, *, index: int,
           digest: bool = True) -> StagedImage:
    """Copy one image part to a temp file, then probe its header and check its end;
    with ``digest``, hash it on the way (SHA-256: ~0.8 ms of CPU per MB here)."""
    fd, tmp = store.stage_upload()
    head = bytearray()
    tail = b""
    size = 0
    sha = hashlib.sha256() if digest else None
    try:
        with os.fdopen(fd, "wb") as fh:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if len(head) < HEAD:
                    head += chunk[:HEAD - len(head)]
                # copied: a chunk may be a view its reader reuses for the next one
                tail = bytes(chunk[-TAIL:]) if len(chunk) >= TAIL else (tail + chunk)[-TAIL:]
                if sha is not None:
                    sha.update(chunk)
                fh.write(chunk)
        if size == 0:
            raise ImageError("the part is empty (0 bytes)", field="image")
        info = _probe(bytes(head), tmp, size)
        check_pixels(info, settings.max_pixels)
        _check_end(info.format, tail)
    except ImageError as exc:
        tmp.unlink(missing_ok=True)
        exc.detail = f"image #{index + 1}: {exc.detail}"
        exc.field = "image"
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedImage(tmp=tmp, format=info.format, width=info.width, height=info.height,
                       nbytes=size, sha256=sha.hexdigest() if sha is not None else "")


def _probe(head: bytes, tmp: Path, size: int) -> Any:
    try:
        return probe(head)
    except ImageError:
        # Only a JPEG can push its size (SOF) past HEAD, behind large EXIF/ICC
        # segments; anything else, or an unknown format, is refused from the head.
        if size <= len(head) or sniff(head) != "jpeg":
            raise
    return probe(tmp.read_bytes())


def _check_end(fmt: str, tail: bytes) -> None:
    """415 for a JPEG/PNG/GIF without its end marker: it was cut short in transit.
    ``tail`` is the image's last bytes, kept while it streamed to disk."""
    marker = END_MARKERS.get(fmt)
    if marker is None:
        return
    tail = tail.rstrip(b"\x00\r\n ")
    if not (tail.endswith(marker) if fmt == "gif" else marker in tail):
        raise ImageError(f"truncated {fmt.upper()}: no end-of-image marker", field="image")
