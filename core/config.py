"""Settings: one frozen dataclass, read from ``IMGPIPE_*`` variables, overridden by flags.

Every endpoint, port, limit and pool size lives here, with its unit in the name or the
doc. ``Settings.from_env(os.environ)`` reads the environment (``IMGPIPE_`` + the field
name in upper case: ``data_dir`` is ``IMGPIPE_DATA_DIR``); ``with_overrides(**flags)``
applies command-line flags; ``validate()`` says what to change when a value is wrong.
Nothing builds settings at import time: ``main()`` builds them and passes them down.

Endpoints are full ZeroMQ URLs that a *connecting* peer uses. Stable nodes (ventilator,
sink, dashboard) bind the same port on ``bind_host`` (loopback by default, ``0.0.0.0``
in containers): see :meth:`Settings.bind_url`. Where several peers of a kind run (two
ventilators, several sinks) an endpoint setting is a comma-separated list: connecting
peers connect to every entry (:func:`endpoints`), and each stable node binds the first
entry nobody else holds (``core.sockets``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imgpipe.core.errors import ConfigError

PREFIX = "IMGPIPE_"
MB = 1024 * 1024


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class Settings:
    """Everything a component needs to know, with documented defaults."""

    # --- storage -------------------------------------------------------------------
    data_dir: Path = _doc("staged uploads, the job store's SQLite database unless "
                          "store_url names another, and by default the image files",
                          Path("data"))
    blob_url: str = _doc("where originals and outputs live: empty for the data dir; a "
                         "directory (/path or file:///path; on several hosts a shared mount); "
                         "s3://bucket/prefix for S3-compatible object storage", "")
    s3_endpoint_url: str = _doc("S3 API endpoint of a server other than AWS (MinIO, Ceph RGW, "
                                "...), e.g. http://minio:9000; empty: AWS. Credentials and "
                                "region: the AWS_* variables boto3 reads", "")
    s3_max_connections: int = _doc("connections each process keeps to the object store (the "
                                   "gateway streams one per request thread)", 20)
    store_url: str = _doc("job store database: empty for SQLite in the data dir, or "
                          "postgresql://user:pass@host:port/db", "")
    store_pool_size: int = _doc("PostgreSQL connections per process at most (a pool)", 8)

    # --- network: stable nodes bind these ports on bind_host ----------------------
    bind_host: str = _doc("interface stable nodes bind (0.0.0.0 in containers)", "127.0.0.1")
    intake_endpoint: str = _doc("gateway -> ventilator job notices (ventilator binds PULL)",
                                "tcp://127.0.0.1:5550")
    light_task_endpoint: str = _doc("ventilator -> workers, light tasks (ventilator binds PUSH)",
                                    "tcp://127.0.0.1:5551")
    heavy_task_endpoint: str = _doc("ventilator -> workers, heavy tasks (ventilator binds PUSH)",
                                    "tcp://127.0.0.1:5552")
    result_endpoint: str = _doc("workers -> sink results (sink binds PULL)", "tcp://127.0.0.1:5553")
    event_endpoint: str = _doc("sink completion events (sink binds PUB)", "tcp://127.0.0.1:5554")
    control_endpoint: str = _doc("registry and stats queries (ventilator binds ROUTER)",
                                 "tcp://127.0.0.1:5555")
    bus_endpoint: str = _doc("heartbeats, claims, metrics into the ventilator (binds SUB)",
                             "tcp://127.0.0.1:5556")
    dashboard_bus_endpoint: str = _doc(
        "heartbeats and metrics into the dashboard (dashboard binds SUB); empty: none",
        "tcp://127.0.0.1:5557")
    gateway_host: str = _doc("interface the HTTP gateway listens on", "127.0.0.1")
    gateway_port: int = _doc("HTTP gateway port", 8000)
    dashboard_port: int = _doc("Streamlit dashboard port", 8501)
    gateway_url: str = _doc("where clients and the dashboard reach the gateway",
                            "http://127.0.0.1:8000")
    curve_server_secret_file: str = _doc(
        "CURVE: stable nodes' secret key file (zmq.auth format); empty: no encryption", "")
    curve_server_public_file: str = _doc("CURVE: stable nodes' public key file", "")
    curve_client_secret_file: str = _doc(
        "CURVE: this peer's secret key file when it connects (its public key is inside)", "")
    curve_authorized_dir: str = _doc(
        "CURVE: folder of public keys allowed to connect; empty: any client with the server key",
        "")

    # --- limits -------------------------------------------------------------------
    max_upload_bytes: int = _doc("largest request body, bytes (checked on Content-Length)",
                                 50 * MB)
    max_pixels: int = _doc("largest image, pixels (checked from the header)", 50_000_000)
    max_images: int = _doc("images per job", 16)
    max_chains: int = _doc("ops chains per job", 16)
    max_filters: int = _doc("filters per chain", 12)
    max_message_bytes: int = _doc("ZMQ_MAXMSGSIZE of the sockets that carry images, bytes",
                                   64 * MB)
    queue_limit: int = _doc("outputs queued or running before the gateway answers 503", 2000)
    max_wait_s: float = _doc("longest ?wait a client may ask for, seconds", 120.0)

    # --- data lifecycle -------------------------------------------------------------
    job_ttl_s: float = _doc("finished jobs expire this many seconds after they finish "
                            "(rows and files; then 410); 0 keeps them", 86400.0)
    max_data_bytes: int = _doc("cap on originals and outputs in the blob store, bytes: past "
                               "it the oldest finished jobs go, then uploads get 507; 0: none",
                               0)
    sweep_interval_s: float = _doc("how often the sink expires jobs and sweeps crash "
                                   "leftovers, seconds", 10.0)

    # --- scheduling and liveness ----------------------------------------------------
    task_timeout_s: float = _doc("lease of one dispatched task before it is re-dispatched, s",
                                 60.0)
    max_attempts: int = _doc("dispatches of one task before it is marked failed", 3)
    heartbeat_interval_s: float = _doc("worker heartbeat period, seconds", 1.0)
    heartbeat_liveness: int = _doc("missed heartbeats before a worker is declared lost", 5)
    lost_visible_s: float = _doc("how long a lost worker stays listed, seconds", 60.0)
    rescan_interval_s: float = _doc("ventilator re-reads the job store this often, seconds", 1.0)
    ventilator_lease_s: float = _doc(
        "the active ventilator's lease in the job store, seconds: renewed every third of it; "
        "a standby takes over within about this long of the active one's death", 5.0)
    metrics_interval_s: float = _doc("metrics publish period, seconds", 1.0)

    # --- worker -------------------------------------------------------------------
    worker_processes: int = _doc("filter processes per worker (process pool size)", 1)
    worker_threads: int = _doc("decode/encode threads per worker", 2)
    worker_slots: int = _doc("tasks a worker holds at once (decoding, filtering, encoding)", 2)
    worker_serves: str = _doc("cost classes a worker takes: light, heavy or all", "all")
    inline_filter_ms: float = _doc(
        "a light chain whose filters are estimated under this many ms runs on the thread "
        "that decoded it, not in the filter pool (the hop costs about that); 0: never", 4.0)
    idle_filter_threads: int = _doc(
        "threads a task's filters (OpenCV, in its filter process) and its JPEG encode (in "
        "bands) use while nothing else on the host is running (a lone image gets every "
        "core); 0: the CPUs the worker may use, 1: never",
        0)
    shm_dir: Path = _doc("where workers put frame segments: a tmpfs (Docker: size it with "
                         "shm_size); the supervisor sweeps dead workers' segments there",
                         Path("/dev/shm"))

    # --- gateway ------------------------------------------------------------------
    gateway_workers: int = _doc("gunicorn worker processes", 2)
    gateway_threads: int = _doc("threads per gunicorn worker", 16)
    gateway_timeout_s: float = _doc("longest a request may take to arrive (slow clients), s",
                                    30.0)
    header_timeout_s: float = _doc(
        "longest a request head (request line and headers) may take to arrive, s", 10.0)

    presets: str = _doc("file of name=chain lines, used as ops=preset:NAME (# comments);"
                        " empty: none", "")

    # --- access and per-client limits -------------------------------------------------
    api_keys: str = _doc("API keys for /api/*: KEY,KEY... or @FILE (one a line, # comments);"
                         " empty: keyless", "")
    insecure: bool = _doc("run beyond loopback without API keys (gateway) or CURVE keys "
                          "(ZeroMQ binds): a network you trust", False)
    admin_key: str = _doc("key the dashboard asks for before scaling; empty: none", "")
    max_job_cost: float = _doc("largest estimated job cost, CPU seconds on the reference"
                               " machine (413 past it)", 600.0)
    client_concurrency: int = _doc("jobs in flight per API key (or client address)", 64)
    client_rate_per_min: float = _doc("jobs per minute per API key (or client address),"
                                      " token bucket of one minute's worth", 600.0)

    # --- local stack --------------------------------------------------------------
    workers: int = _doc("workers the local stack starts", 3)
    autoscale: str = _doc("MIN:MAX workers for the local autoscaler; empty: advice only", "")

    # --- diagnostics and tests ------------------------------------------------------
    log_level: str = _doc("logging level", "INFO")
    test_hooks: bool = _doc("enable test-only filters and delays (never in production)", False)
    worker_delay_ms: int = _doc("test hook: extra delay per task in a worker, ms", 0)

    # ------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``IMGPIPE_*`` variables; unknown ``IMGPIPE_*`` names are errors."""
        env = os.environ if environ is None else environ
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):].lower()
            if name in _NOT_SETTINGS:
                continue
            if name not in known:
                raise ConfigError(f"{key} is not a setting; see `imgpipe config` for the list",
                                  field=key)
            values[name] = _parse(name, raw)
        return cls(**values)

    def with_overrides(self, **flags: Any) -> Settings:
        """A copy with the given fields replaced; ``None`` means 'flag not given'."""
        return dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})

    def validate(self) -> Settings:
        """Raise ConfigError naming the variable and what to change; return self when fine."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{PREFIX}{name.upper()}={getattr(self, name)!r}: {what}",
                                  field=name)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_endpoint") and value:
                for one in value.split(","):
                    one = one.strip()
                    need(urlsplit(one).scheme in ("tcp", "ipc", "inproc"), f.name,
                         "use a ZeroMQ URL such as tcp://127.0.0.1:5551 or ipc:///tmp/x, or "
                         "several joined by commas (one per ventilator or sink)")
                    if one.startswith("tcp://"):
                        need(_port(one) is not None, f.name,
                             "give a port, as in tcp://host:5551")
        for name in ("gateway_port", "dashboard_port"):
            need(0 <= getattr(self, name) < 65536, name, "use a port from 1 to 65535 (0: any)")
        for name in ("max_upload_bytes", "max_pixels", "max_images", "max_chains",
                     "max_filters", "max_message_bytes", "queue_limit", "max_attempts",
                     "heartbeat_liveness", "worker_processes", "worker_threads",
                     "worker_slots", "gateway_workers", "gateway_threads",
                     "client_concurrency", "s3_max_connections", "store_pool_size"):
            need(getattr(self, name) >= 1, name, "use a whole number of at least 1")
        need(self.job_ttl_s >= 0, "job_ttl_s", "use 0 (keep forever) or a number of seconds")
        need(self.max_data_bytes >= 0, "max_data_bytes", "use 0 (no cap) or a number of bytes")
        need(0 <= self.idle_filter_threads <= 256, "idle_filter_threads",
             "use 0 (every CPU), 1 (never more than one) up to 256")
        need(0 <= self.inline_filter_ms <= 1000, "inline_filter_ms",
             "use 0 (always the pool) up to 1000 ms")
        blob = urlsplit(self.blob_url)
        need(blob.scheme in ("", "file", "s3") and not (blob.scheme == "s3" and not blob.netloc)
             and not (blob.scheme == "file" and not blob.path), "blob_url",
             "use a directory (/srv/blobs or file:///srv/blobs) or s3://bucket/prefix")
        need(urlsplit(self.s3_endpoint_url).scheme in ("", "http", "https")
             and (not self.s3_endpoint_url or bool(urlsplit(self.s3_endpoint_url).netloc)),
             "s3_endpoint_url", "use an http:// or https:// URL, e.g. http://minio:9000")
        for name in ("task_timeout_s", "heartbeat_interval_s", "rescan_interval_s",
                     "metrics_interval_s", "gateway_timeout_s", "max_wait_s",
                     "sweep_interval_s", "header_timeout_s", "max_job_cost",
                     "client_rate_per_min", "ventilator_lease_s"):
            need(getattr(self, name) > 0, name, "use a positive number of seconds")
        need(not self.store_url or urlsplit(self.store_url).scheme in ("postgresql", "postgres"),
             "store_url", "use postgresql://user:password@host:5432/dbname, or nothing for "
             "SQLite in the data dir")
        need(self.max_message_bytes > self.max_upload_bytes, "max_message_bytes",
             "make it larger than IMGPIPE_MAX_UPLOAD_BYTES so an accepted image fits a message")
        need(self.worker_serves in ("light", "heavy", "all"), "worker_serves",
             "use light, heavy or all")
        need(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             "use DEBUG, INFO, WARNING or ERROR")
        if self.autoscale:
            need(parse_range(self.autoscale) is not None, "autoscale",
                 "use MIN:MAX with 1 <= MIN <= MAX, e.g. 1:6")
        need(self.curve_enabled or not (self.curve_server_secret_file
                                        or self.curve_client_secret_file),
             "curve_server_public_file",
             "set the CURVE server public key file too (every peer needs it), or no CURVE file")
        return self

    # --- derived ----------------------------------------------------------------------
    def bind_url(self, endpoint: str) -> str:
        """The URL a stable node binds for ``endpoint``: same port, on ``bind_host``."""
        if not endpoint.startswith("tcp://"):
            return endpoint
        host = "*" if self.bind_host in WILDCARDS else self.bind_host
        return f"tcp://{host}:{_port(endpoint)}"

    @property
    def bus_endpoints(self) -> tuple[str, ...]:
        """Every SUB endpoint a publisher connects its PUB socket to: each ventilator's
        bus, and the dashboard's."""
        return (*endpoints(self.bus_endpoint), *endpoints(self.dashboard_bus_endpoint))

    @property
    def curve_enabled(self) -> bool:
        """CURVE is on when the server's public key and some secret key are set.

        Stable nodes need the server secret; a connecting peer (a remote worker)
        needs only the server's public key and its own key pair.
        """
        return bool(self.curve_server_public_file
                    and (self.curve_server_secret_file or self.curve_client_secret_file))

    @property
    def liveness_s(self) -> float:
        """Seconds without a heartbeat before a worker is declared lost."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def to_env(self) -> dict[str, str]:
        """``IMGPIPE_*`` variables that make a child process build these same settings."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) \
                else str(value)
        return out

    def describe(self) -> list[dict[str, str]]:
        """Every setting with its variable, current value and doc (for `imgpipe config`);
        secrets are shown as set or not, never their value."""
        return [{"variable": PREFIX + f.name.upper(),
                 "value": ("(set)" if getattr(self, f.name) else "") if f.name in SECRETS
                 else redact(self.store_url) if f.name == "store_url"
                 else str(getattr(self, f.name)),
                 "doc": f.metadata.get("doc", "")} for f in dataclasses.fields(self)]


# Variables with the prefix that are not settings (read by other tools): the gateway
# URL and the one API key a client sends.
_NOT_SETTINGS = {"url", "api_key"}
SECRETS = ("api_keys", "admin_key")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def endpoints(value: str) -> tuple[str, ...]:
    """The entries of an endpoint setting: ``"tcp://a:5553,tcp://b:5553"`` -> both; ``""``
    -> none. A connecting peer connects to each (PUSH round-robins over the live ones,
    SUB hears every publisher)."""
    return tuple(e.strip() for e in value.split(",") if e.strip())


def redact(url: str) -> str:
    """``url`` with its password shown as ``***`` (`imgpipe config`, logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def is_loopback(host: str) -> bool:
    """True for an interface only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def client_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every HTTP client of the gateway sends: ``Authorization: Bearer
    $IMGPIPE_API_KEY`` when that variable is set, else nothing."""
    key = (os.environ if environ is None else environ).get(PREFIX + "API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


WILDCARDS = ("0.0.0.0", "*", "", "::")


def reachable_host(host: str) -> str:
    """The address a local client uses for a server bound on ``host`` (a wildcard -> loopback)."""
    return "127.0.0.1" if host in WILDCARDS else host


def parse_range(text: str) -> tuple[int, int] | None:
    """``"MIN:MAX"`` -> (MIN, MAX) with 1 <= MIN <= MAX, else None."""
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        return None
    a, b = int(lo), int(hi)
    return (a, b) if 1 <= a <= b else None


def _port(endpoint: str) -> int | None:
    try:
        return urlsplit(endpoint).port
    except ValueError:
        return None


def _parse(name: str, raw: str) -> Any:
    hints = typing.get_type_hints(Settings)
    kind = hints[name]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw)
        if kind in (int, float):
            return kind(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}",
                          field=name) from None


def add_settings_args(parser: Any, *names: str) -> None:
    """Add ``--flag`` options for the named settings, each defaulting to 'not given'.

    Flags use the field name with dashes (``data_dir`` -> ``--data-dir``) plus the
    short aliases of DESIGN.md (``--data``, ``--port``); values are parsed like the
    environment variable of the same setting.
    """
    aliases = {"data_dir": ["--data"], "gateway_port": ["--port"],
               "dashboard_port": ["--dashboard-port"], "worker_serves": ["--serves"]}
    docs = {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(Settings)}
    for name in names:
        flags = ["--" + name.replace("_", "-"), *aliases.get(name, [])]
        flags = list(dict.fromkeys(flags))
        parser.add_argument(*flags, dest=name, default=None, metavar=name.split("_")[-1].upper(),
                            type=lambda raw, n=name: _parse(n, raw),
                            help=f"{docs[name]} (env {PREFIX}{name.upper()})")


def settings_from_args(ns: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Environment first, then the flags that were given; validated."""
    known = {f.name for f in dataclasses.fields(Settings)}
    flags = {k: v for k, v in vars(ns).items() if k in known}
    return Settings.from_env(environ).with_overrides(**flags).validate()
