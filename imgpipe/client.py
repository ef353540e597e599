"""``imgpipe submit``: upload images over HTTP, wait for the job, save the outputs.

It speaks only the public HTTP API (docs/gateway.md), so it works against any gateway:
``POST /api/process/`` with one ``image`` part per file and one ``ops`` field per
chain, then ``GET /api/jobs/{id}`` until the job is final (``?wait`` does the waiting
server-side, in slices, so a long job never hits a proxy's idle timeout), then
``GET`` every output into ``-o DIR`` as ``<image stem>-<n>.<ext>``.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from imgpipe.core.config import client_headers
from imgpipe.core.records import FINAL_JOB

DEFAULT_URL = "http://127.0.0.1:8000"
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/avif": "avif"}


def submit(url: str, files: Sequence[Path], chains: Sequence[str], *,
           client: httpx.Client) -> dict[str, Any]:
    """POST the files and chains; the job document the gateway answered with."""
    parts = [("image", (f.name, f.read_bytes(), mimetypes.guess_type(f.name)[0]
                        or "application/octet-stream")) for f in files]
    resp = client.post(f"{url}/api/process/", files=parts, data={"ops": list(chains)})
    _check(resp)
    return dict(resp.json())


def wait(url: str, job_id: str, *, client: httpx.Client, timeout: float) -> dict[str, Any]:
    """The job once final, or as it stands when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        resp = client.get(f"{url}/api/jobs/{job_id}",
                          params={"wait": f"{max(0.0, min(left, 20.0)):.1f}"})
        _check(resp)
        job = dict(resp.json())
        if job["state"] in FINAL_JOB or left <= 0:
            return job


def download(url: str, job: dict[str, Any], files: Sequence[Path], out: Path, *,
             client: httpx.Client) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for o in job["outputs"]:
        if o["state"] != "done":
            continue
        resp = client.get(url + o["url"])
        _check(resp)
        ext = _EXT.get(o.get("content_type") or "", "bin")
        path = out / f"{files[o['image']].stem}-{o['n']}.{ext}"
        path.write_bytes(resp.content)
        saved.append(path)
    return saved


class ClientError(Exception):
    pass


def _check(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
        detail = f"{body.get('error')}: {body.get('detail')}"
    except ValueError:
        detail = resp.text[:200]
    raise ClientError(f"HTTP {resp.status_code}: {detail}")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgpipe submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--ops", action="append", default=[], metavar="SPEC",
                        help="a filter chain, e.g. 'resize:w=1920|blur:radius=2'; repeat "
                             "for several outputs per image (default: the gateway's three, "
                             "resize:w=1920, blur:radius=3 and brightness:factor=1.2)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to finish")
    parser.add_argument("-o", "--out", type=Path, help="save the outputs here (implies --wait)")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait, seconds")
    parser.add_argument("--url", default=os.environ.get("IMGPIPE_URL", DEFAULT_URL),
                        help=f"gateway (default {DEFAULT_URL} or $IMGPIPE_URL)")
    parser.add_argument("--json", action="store_true", help="print the job document as JSON")
    ns = parser.parse_args(argv)
    missing = [str(f) for f in ns.files if not f.is_file()]
    if missing:
        print(f"imgpipe submit: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    url = ns.url.rstrip("/")
    try:
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0),
                          headers=client_headers()) as client:
            job = submit(url, ns.files, ns.ops, client=client)
            if ns.wait or ns.out:
                job = wait(url, job["id"], client=client, timeout=ns.timeout)
            saved = download(url, job, ns.files, ns.out, client=client) if ns.out else []
    except (httpx.HTTPError, ClientError) as exc:
        print(f"imgpipe submit: {url}: {exc}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(job, indent=2))
    else:
        p = job["progress"]
        print(f"job {job['id']}: {job['state']} ({p['done']} done, {p['failed']} failed, "
              f"{p['total']} total)")
        for o in job["outputs"]:
            note = o.get("error") or f"{o.get('width')}x{o.get('height')} {o.get('content_type')}"
            print(f"  [{o['n']}] {ns.files[o['image']].name} | {o['ops']} -> {o['state']} {note}")
        for path in saved:
            print(f"  saved {path}")
    return 0 if job["state"] in ("done", "queued", "running") else 1
