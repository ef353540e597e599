"""The wire: every message imgpipe sends over ZeroMQ, and the only code that knows frames.

Frame layout (multipart, no pickle anywhere)::

    pipeline sockets (PUSH/PULL, ROUTER/DEALER):  [header, payload?]
    bus sockets (PUB/SUB):                        [topic, header]

* ``header`` is UTF-8 JSON, an object with ``"v"`` (protocol major version) and
  ``"kind"`` plus the message's fields. Unknown fields are ignored and new fields get
  defaults, so an older peer still decodes a newer message of the same major version.
* ``payload`` is raw image bytes in its own frame (a task's original, a result's
  encoded output), sent with ``copy=False`` and received as a zero-copy buffer.
* ``topic`` is one of the ``TOPIC_*`` constants; SUB sockets subscribe by prefix.

:func:`encode` turns a message into frames; :func:`decode` turns frames back into a
message and raises :class:`ProtocolError` for anything else: missing or extra frames,
bad JSON, a wrong version, an unknown kind, a missing or mistyped field (element types
of lists and maps included), a value outside a ``Literal`` field's few known ones,
``NaN`` or infinite numbers, a header over
:data:`MAX_HEADER_BYTES` or nested deeper than :data:`MAX_DEPTH`. Nothing a peer sends
makes it raise anything else, so a receive loop that catches ``ProtocolError`` per
message cannot be stopped by a frame.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from imgpipe.core.errors import ProtocolError

VERSION = 1
MAX_HEADER_BYTES = 1024 * 1024  # most are a few hundred bytes; a fleet listing is the largest
MAX_DEPTH = 8  # JSON nesting a header may have (metric values: one map deep)

TOPIC_HEARTBEAT = b"hb"
TOPIC_CLAIM = b"claim"
TOPIC_METRIC = b"metric"
TOPIC_EVENT = b"event"
TOPIC_DONE = b"done"

STAGES = ("queue", "decode", "filters", "encode", "total")
WORK_STAGES = STAGES[:-1]  # the parts of a task's time; "total" is their span

GravityNote = Literal["smart", "center"]
"""Where the smart-gravity steps of an output's chain put their window: ``smart`` when
every one was placed by the interest score, ``center`` when one fell back to the centre
(no interest: a flat image). An output without such a placement has none (``None``)."""
GRAVITY_NOTES: tuple[GravityNote, ...] = typing.get_args(GravityNote)


def _payload() -> Any:
    return field(default=b"", repr=False, metadata={"wire": "payload"})


@dataclass
class Message:
    kind: ClassVar[str] = ""
    has_payload: ClassVar[bool] = False


@dataclass
class Notice(Message):
    """Gateway -> ventilator: a job was recorded in the store; dispatch it now."""

    kind: ClassVar[str] = "notice"
    job_id: str
    outputs: int = 0


@dataclass
class Task(Message):
    """Ventilator -> worker: run ``ops`` on the original image in ``payload``."""

    kind: ClassVar[str] = "task"
    has_payload: ClassVar[bool] = True
    task_id: str
    job_id: str
    n: int
    ops: str
    attempt: int = 1
    cost: str = "light"
    queued_at: float = 0.0
    dispatched_at: float = 0.0
    deadline: float = 0.0
    lease: str = ""  # the dispatch's token (core.lease); the result carries it back
    payload: Any = _payload()


@dataclass
class Result(Message):
    """Worker -> sink: the encoded output (``ok``) or the reason it failed.

    ``timings`` holds milliseconds per stage (see ``STAGES``). ``retry`` marks a
    failure that was not the input's fault (the filter process died, the deadline
    passed): the sink does not finish the output but publishes ``Done(state="retry")``
    so the ventilator dispatches it again (up to ``max_attempts``). A failure without
    ``retry`` (corrupt image, a filter refusing its input) is final at once.
    ``gravity`` is the :data:`GravityNote` of a done output whose chain placed a window
    by ``gravity=smart``, else ``None``.
    """

    kind: ClassVar[str] = "result"
    has_payload: ClassVar[bool] = True
    task_id: str
    job_id: str
    n: int
    attempt: int
    worker: str
    ok: bool
    error: str = ""
    width: int = 0
    height: int = 0
    content_type: str = ""
    format: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    retry: bool = False
    lease: str = ""  # the task's token, without which the sink drops the result
    gravity: GravityNote | None = None
    payload: Any = _payload()


@dataclass
class Heartbeat(Message):
    """Worker -> bus, every ``heartbeat_interval_s``: liveness, load and resources."""

    kind: ClassVar[str] = "heartbeat"
    worker: str
    host: str
    pid: int
    seq: int
    ts: float
    state: str = "idle"
    serves: str = "all"
    slots: int = 1
    free: int = 1
    inflight: list[str] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    cpu: float = 0.0
    rss: int = 0
    started: float = 0.0
    shm_bytes: int = 0  # shared memory the worker's frame segments hold now
    note: str = ""  # why the worker runs below what it was asked (e.g. slots lowered)


@dataclass
class Claim(Message):
    """Worker -> bus: it took ``task_id`` off its socket (the lease now names it)."""

    kind: ClassVar[str] = "claim"
    worker: str
    task_id: str
    attempt: int
    ts: float


@dataclass
class Metric(Message):
    """Any component -> bus: a numbered snapshot of its counters and gauges.

    ``seq`` increases by one per message from one ``source``, so a subscriber can
    count what PUB dropped at its high-water mark.
    """

    kind: ClassVar[str] = "metric"
    source: str
    role: str
    seq: int
    ts: float
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Event(Message):
    """A fleet event worth a line in a log: worker joined/lost, retry, task failed."""

    kind: ClassVar[str] = "event"
    source: str
    what: str
    ts: float
    detail: str = ""
    worker: str = ""
    task_id: str = ""


@dataclass
class Done(Message):
    """Sink -> event PUB: an output reached a final state (``done``, ``failed``), or
    ``retry`` (a worker gave it back; the ventilator dispatches it again), or was a
    ``duplicate`` (a late result for an output already final; dropped).

    ``attempt`` is the dispatch the result came from (0: unknown), so the ventilator
    can ignore a ``retry`` from an attempt it has already replaced; ``error`` is the
    reason of a ``retry`` or ``failed``.
    """

    kind: ClassVar[str] = "done"
    task_id: str
    job_id: str
    n: int
    state: str
    job_state: str = ""
    attempt: int = 0
    error: str = ""


@dataclass
class Request(Message):
    """Control request (REQ/DEALER -> ventilator ROUTER): ``op`` names what is asked."""

    kind: ClassVar[str] = "request"
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply(Message):
    """Control reply: ``data`` when ``ok``, else ``error``."""

    kind: ClassVar[str] = "reply"
    ok: bool
    data: Any = None
    error: str = ""
    role: str = ""  # a ventilator's: "active" or "standby" (see core.control.ask)


M = typing.TypeVar("M", bound=Message)

KINDS: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (Notice, Task, Result, Heartbeat, Claim, Metric, Event, Done, Request, Reply)
}
TOPICS: dict[type[Message], bytes] = {
    Heartbeat: TOPIC_HEARTBEAT, Claim: TOPIC_CLAIM, Metric: TOPIC_METRIC,
    Event: TOPIC_EVENT, Done: TOPIC_DONE,
}

_BASE = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,),
         dict: (dict,), type(None): (type(None),)}
_UNIONS = (typing.Union, types.UnionType)


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: ``[header]`` or ``[header, payload]``."""
    header: dict[str, Any] = {"v": VERSION, "kind": msg.kind}
    for name, *_ in _schema(type(msg)):
        header[name] = getattr(msg, name)
    frames: list[Any] = [json.dumps(header, separators=(",", ":")).encode()]
    if msg.has_payload:
        frames.append(msg.payload)  # type: ignore[attr-defined]
    return frames


def encode_topic(msg: Message) -> list[Any]:
    """Frames for a PUB socket: ``[topic, header]``."""
    topic = TOPICS.get(type(msg))
    if topic is None:
        raise ProtocolError(f"{msg.kind} messages are not published on the bus")
    return [topic, *encode(msg)]


@typing.overload
def decode(frames: Sequence[Any], expect: type[M]) -> M: ...
@typing.overload
def decode(frames: Sequence[Any], expect: None = None) -> Message: ...


def decode(frames: Sequence[Any], expect: type[Message] | None = None) -> Message:
    """The message in ``frames`` (bytes, memoryviews or zmq.Frame); ProtocolError if not one.

    A payload frame is returned as a zero-copy ``memoryview`` when it arrives as a
    ``zmq.Frame``. With ``expect``, any other kind is refused too.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = _header(frames[0])
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {str(kind)[:40]!r}")
    if expect is not None and cls is not expect:
        raise ProtocolError(f"expected a {expect.kind} message, got {cls.kind}")
    want = 2 if cls.has_payload else 1
    if len(frames) != want:
        raise ProtocolError(f"{cls.kind}: expected {want} frame(s), got {len(frames)}")
    values: dict[str, Any] = {}
    for name, base, args, required, check in _schema(cls):
        if name not in header:
            if required:
                raise ProtocolError(f"{cls.kind}: missing field {name!r}")
            continue
        value = header[name]
        if not check(value):
            raise ProtocolError(f"{cls.kind}: field {name!r} must be {_describe(base, args)}")
        values[name] = float(value) if base is float else value
    msg = cls(**values)
    if cls.has_payload:
        msg.payload = _buffer(frames[1])  # type: ignore[attr-defined]
    return msg


def decode_topic(frames: Sequence[Any]) -> Message:
    """The message in a bus frame list ``[topic, header]``; ProtocolError if not one."""
    if len(frames) != 2:
        raise ProtocolError(f"bus message: expected 2 frames, got {len(frames)}")
    msg = decode(frames[1:])
    if TOPICS.get(type(msg)) != bytes(_buffer(frames[0])):
        raise ProtocolError(f"{msg.kind} published under the wrong topic")
    return msg


Check = Callable[[Any], bool]
# name, base type, type arguments, required, and the field's check (see _checker)
Field = tuple[str, Any, tuple[Any, ...], bool, Check]
_SCHEMAS: dict[type[Message], tuple[Field, ...]] = {}


def _schema(cls: type[Message]) -> tuple[Field, ...]:
    """(name, base type, type arguments, required, check) of each header field, in field
    order; once per class.

    ``typing.get_type_hints`` parses the string annotations again on every call, which
    cost more than the rest of ``decode`` together: it runs once per class here, and so
    does taking each type apart into its check.
    """
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("wire"):
                continue
            base = typing.get_origin(hints[f.name]) or hints[f.name]
            args = typing.get_args(hints[f.name])
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, base, args, required, _checker(base, args)))
        schema = _SCHEMAS[cls] = tuple(fields)
    return schema


def _checker(base: Any, args: tuple[Any, ...]) -> Check:
    """Whether a JSON value fits a field's type: ``int``, ``float`` (ints too), ``str``,
    ``bool``, ``list[T]``, ``dict[str, T]``, ``Literal[...]`` (one of its values, of the
    same type), ``T | None`` or ``Any``; a bool is never a number. The type is taken
    apart here, once: the check only tests values."""
    if base is Literal:
        values = tuple((type(a), a) for a in args)
        return lambda v: any(type(v) is t and v == a for t, a in values)
    if base in _UNIONS:
        parts = tuple(_checker(typing.get_origin(a) or a, typing.get_args(a)) for a in args)
        return lambda v: any(part(v) for part in parts)
    allowed = _BASE.get(base)
    if allowed is None:
        return lambda v: True  # Any: whatever JSON holds (depth and size are bounded in _header)
    if base is bool:
        return lambda v: isinstance(v, bool)
    if base is list and args:
        item = _checker(typing.get_origin(args[0]) or args[0], typing.get_args(args[0]))
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    if base is dict and args:
        key, val = args
        value = _checker(typing.get_origin(val) or val, typing.get_args(val))
        return lambda v: isinstance(v, dict) and all(isinstance(k, key) and value(x)
                                                     for k, x in v.items())
    return lambda v: isinstance(v, allowed) and not isinstance(v, bool)


def _describe(base: Any, args: tuple[Any, ...]) -> str:
    if base is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if base in _UNIONS:
        return " or ".join(_describe(typing.get_origin(a) or a, typing.get_args(a))
                           for a in args)
    if base is type(None):
        return "null"
    name = getattr(base, "__name__", str(base))
    return f"{name}[{', '.join(getattr(a, '__name__', str(a)) for a in args)}]" if args else name


def _buffer(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)


def _header(frame: Any) -> dict[str, Any]:
    try:
        raw = bytes(_buffer(frame))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not bytes: {exc}") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes, over {MAX_HEADER_BYTES}")
    if _depth(raw) > MAX_DEPTH:
        raise ProtocolError(f"header nested deeper than {MAX_DEPTH}")
    try:
        header = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, this peer speaks {VERSION}")
    return header


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this protocol carries")


# One decoder for every header: json.loads with a keyword builds a new one per call
# (half the cost of a header's parse). Headers are UTF-8 JSON, nothing else.
_JSON = json.JSONDecoder(parse_constant=_no_constant)


def _depth(raw: bytes) -> int:
    """An upper bound of the JSON nesting in ``raw`` (brackets inside strings count too,
    which only errs on the safe side), found without parsing."""
    depth = deepest = 0
    for b in raw.translate(None, delete=_NOT_BRACKETS):
        depth += 1 if b in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
