"""Cost limits at the door (413) and per-client rate and concurrency limits (429)."""

from __future__ import annotations

from typing import Any

import pytest

from imgpipe.core.config import Settings
from imgpipe.filters import parse_chain
from imgpipe.filters.chain import estimate_ms, output_size
from imgpipe.gateway.errors import OutputTooLarge, TooExpensive, TooManyRequests
from imgpipe.gateway.limits import ClientLimits, check_cost
from imgpipe.gateway.upload import DEFAULT_CHAINS
from tests.gateway import images as im

K4 = (3840, 2160)
HUGE = "resize:w=7000,h=7000,fit=fill|denoise"


@pytest.mark.parametrize(("spec", "size", "want"), [
    ("invert", (640, 480), (640, 480)),
    ("resize:w=16384,h=16384,fit=fill", (8, 8), (16384, 16384)),
    ("resize:w=1920", K4, (1920, 1080)),
    ("resize:w=100,h=100", (400, 200), (100, 50)),
    ("crop:x=10,y=10,w=50,h=500|rotate", (100, 100), (90, 50)),
    ("rotate:deg=45", (100, 100), (142, 142)),
    ("resize:w=200|crop:w=50", (100, 50), (50, 100)),
])
def test_output_size_follows_every_step(spec: str, size: tuple[int, int],
                                        want: tuple[int, int]) -> None:
    assert output_size(parse_chain(spec), *size) == want


def test_estimates_grow_with_pixels_and_weight() -> None:
    small = estimate_ms(parse_chain("invert"), 640, 480)
    assert 0 < small < estimate_ms(parse_chain("invert"), *K4)
    assert estimate_ms(parse_chain("invert"), *K4) < estimate_ms(parse_chain("denoise"), *K4)
    assert estimate_ms(parse_chain("resize:w=7000,h=7000,fit=fill"), 8, 8) > \
        estimate_ms(parse_chain("invert"), 8, 8) * 100


def test_a_normal_job_passes_16_4k_images_with_the_default_chains() -> None:
    assert check_cost([K4] * 16, list(DEFAULT_CHAINS), Settings()) < Settings().max_job_cost


def test_sixteen_tiny_images_with_sixteen_huge_chains_are_refused() -> None:
    with pytest.raises(TooExpensive):
        check_cost([(8, 8)] * 16, [HUGE] * 16, Settings())


def test_a_job_over_the_total_budget_names_the_setting() -> None:
    chains = ["resize:w=4000,h=4000,fit=fill|denoise"] * 16
    with pytest.raises(TooExpensive, match="IMGPIPE_MAX_JOB_COST"):
        check_cost([(8, 8)] * 16, chains, Settings())


def test_one_output_over_half_the_task_deadline_is_refused() -> None:
    with pytest.raises(TooExpensive, match="per-output budget"):
        check_cost([(8, 8)], [HUGE], Settings())
    check_cost([(8, 8)], [HUGE], Settings(task_timeout_s=600, max_job_cost=10_000))


def test_an_output_over_max_pixels_is_refused_naming_the_chain() -> None:
    with pytest.raises(OutputTooLarge, match="ops #2"):
        check_cost([(8, 8)], ["invert", "resize:w=16384,h=16384,fit=fill"], Settings())


def test_over_the_rate_limit_is_429_with_retry_after(settings: Settings,
                                                     make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(client_rate_per_min=2))
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    assert [gw.post(body, ctype).status_code for _ in range(2)] == [202, 202]
    res = gw.post(body, ctype)
    assert res.status_code == 429, res.text
    assert res.json["error"] == "rate_limited"
    assert 1 <= int(res.headers["retry-after"]) <= 30
    # Another client address has its own bucket.
    other = gw.client.simulate_post("/api/process/", body=body, remote_addr="10.9.8.7",
                                    headers={"Content-Type": ctype})
    assert other.status_code == 202
    assert gw.store.totals().jobs == 3


def test_over_the_concurrency_limit_is_429_until_a_job_finishes(settings: Settings,
                                                                make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(client_concurrency=1))
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    first = gw.post(body, ctype)
    assert first.status_code == 202
    res = gw.post(body, ctype)
    assert res.status_code == 429, res.text
    assert res.json["error"] == "too_many_jobs" and int(res.headers["retry-after"]) >= 1
    gw.store.fail(f"{first.json['id']}:0", "done with it")
    assert gw.post(body, ctype).status_code == 202


def test_keys_are_limited_separately(settings: Settings, make_gateway: Any) -> None:
    gw = make_gateway(settings.with_overrides(client_concurrency=1, api_keys="a1,b2"))
    body, ctype = im.multipart([im.jpeg()], ["invert"])
    assert gw.post(body, ctype, headers={"Authorization": "Bearer a1"}).status_code == 202
    assert gw.post(body, ctype, headers={"Authorization": "Bearer a1"}).status_code == 429
    assert gw.post(body, ctype, headers={"Authorization": "Bearer b2"}).status_code == 202


def test_the_bucket_refills_with_time(settings: Settings) -> None:
    now = [0.0]
    limits = ClientLimits(settings.with_overrides(client_rate_per_min=60), _NoJobs(),
                          clock=lambda: now[0])
    for _ in range(60):
        limits.admit("c")
    with pytest.raises(TooManyRequests) as exc:
        limits.admit("c")
    assert exc.value.retry_after == 1
    now[0] += 1.0
    limits.admit("c")


class _NoJobs:
    def open_jobs_of(self, owner: str) -> int:
        return 0
