"""Where load may go: loopback by default."""

from __future__ import annotations

import pytest

from imgpipe.bench.client import check_target, is_loopback


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"])
def test_loopback_urls(url: str) -> None:
    assert is_loopback(url)
    assert check_target(url, allow_remote=False) is None


@pytest.mark.parametrize("url", ["http://192.0.2.10:8000", "http://10.1.2.3"])
def test_remote_urls_need_allow_remote(url: str) -> None:
    assert not is_loopback(url)
    assert "--allow-remote" in (check_target(url, allow_remote=False) or "")
    assert check_target(url, allow_remote=True) is None


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:8000", "http://"])
def test_non_http_urls_are_refused(url: str) -> None:
    assert check_target(url, allow_remote=True) is not None
