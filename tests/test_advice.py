"""Scaling advice: the rules of core.advice as a table, and the autoscaler's hysteresis."""

from __future__ import annotations

from typing import Any

import pytest

from imgpipe.core.advice import MAINTAIN, SCALE_DOWN, SCALE_UP, Autoscaler, recommend


def m(alive: int = 0, busy: int = 0, queue: int = 0, in_flight: int = 0, rate: float = 0.0,
      trend: float | None = None, lost: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "queue_depth": queue, "in_flight": in_flight, "throughput_per_s": rate,
        "workers": {"alive": alive, "busy": busy, "idle": alive - busy, "lost": lost},
        "latency_ms": {"p50": 100.0, "p95": 200.0, "p99": 300.0}}
    if trend is not None:
        out["queue_trend_per_s"] = trend
    return out


CASES = [
    # name, metrics, action, suggested workers, words the reason must hold
    ("nothing at all", m(), MAINTAIN, 0, "no live worker"),
    ("no worker, work queued", m(queue=5), SCALE_UP, 1, "no live worker"),
    ("no worker, only in flight", m(in_flight=2, lost=2), SCALE_UP, 1, "2 lost"),
    ("burst just started: nothing finished yet", m(alive=3, busy=3, queue=44, in_flight=6),
     SCALE_UP, 4, "no output finished yet"),
    # Little: 3 busy at 3/s -> 1/s each; arrivals 3 + 40/10 s drain = 7/s -> 7 workers
    ("busy fleet, backlog", m(alive=3, busy=3, queue=40, rate=3.0), SCALE_UP, 7, "100%"),
    # the same at 4 alive would want 7 too; a step at most doubles (+1): 2*2+1 = 5
    ("big backlog, step capped", m(alive=2, busy=2, queue=200, rate=2.0), SCALE_UP, 5, "drain"),
    ("busy, queue empty but growing", m(alive=4, busy=4, rate=4.0, trend=2.0), SCALE_UP, 6,
     "growing 2.0/s"),
    ("busy, keeping up", m(alive=4, busy=4, in_flight=8, rate=8.0, trend=0.0), MAINTAIN, 4,
     "keeping up"),
    ("80% busy is busy", m(alive=5, busy=4, queue=3, rate=4.0), SCALE_UP, 6, "80%"),
    ("half busy, queue being taken", m(alive=4, busy=2, queue=10, rate=2.0), MAINTAIN, 4,
     "taking the 10 queued"),
    ("idle fleet", m(alive=4), SCALE_DOWN, 2, "0 of 4"),
    ("idle, one worker", m(alive=1), MAINTAIN, 1, "one worker"),
    ("low load keeps enough for it", m(alive=10, busy=3, rate=3.0), SCALE_DOWN, 5, "3 of 10"),
    ("idle but queue still growing", m(alive=4, trend=1.0), MAINTAIN, 4, "0 of 4"),
    ("idle, queue shrinking", m(alive=3, trend=-2.0), SCALE_DOWN, 2, "empty"),
    ("moderate load", m(alive=3, busy=2, rate=2.0), MAINTAIN, 3, "2 of 3"),
    ("garbage numbers count as zero", {"workers": "x", "queue_depth": None}, MAINTAIN, 0, ""),
    ("inflight spelled as the ventilator does",
     {"workers": {"alive": 0}, "inflight": 3}, SCALE_UP, 1, "3 in flight"),
]


@pytest.mark.parametrize(("metrics", "action", "workers", "words"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_recommend_table(metrics: dict[str, Any], action: str, workers: int, words: str) -> None:
    advice = recommend(metrics)
    assert advice["action"] == action, advice
    assert advice["workers"] == workers, advice
    assert words in advice["reason"]
    assert set(advice) == {"action", "reason", "workers"}


def test_recommend_follows_a_burst_and_its_end() -> None:
    """The brief's demo as numbers: idle, a burst of 50 arrives, it drains, idle again."""
    assert recommend(m(alive=3))["action"] == SCALE_DOWN
    assert recommend(m(alive=3, busy=3, queue=47, in_flight=3))["action"] == SCALE_UP
    assert recommend(m(alive=3, busy=3, queue=20, rate=3.0, trend=-3.0))["action"] == SCALE_UP
    assert recommend(m(alive=3, busy=1, rate=1.0, trend=-1.0))["action"] == MAINTAIN


def run(scaler: Autoscaler, seq: list[dict[str, Any]], start: float = 0.0) -> list[int | None]:
    return [scaler.observe(obs, start + i) for i, obs in enumerate(seq)]


def test_autoscaler_needs_a_streak_to_scale_up() -> None:
    scaler = Autoscaler(1, 8, current=3)
    busy = m(alive=3, busy=3, queue=40, rate=3.0)
    assert run(scaler, [busy, m(alive=3, busy=2), busy]) == [None, None, None]
    assert scaler.observe(busy, 3) == 7          # second in a row
    assert scaler.current == 7


def test_autoscaler_cooldown_after_acting() -> None:
    scaler = Autoscaler(1, 40, current=2, cooldown_s=5.0)
    changes = []
    for t in range(12):                          # the fleet follows, still swamped
        n = scaler.current or 0
        got = scaler.observe(m(alive=n, busy=n, queue=1000, rate=float(n)), t)
        if got is not None:
            changes.append((t, got))
    assert changes[0] == (1, 5)
    assert changes[1] == (6, 11)                 # not before the cooldown ends


def test_autoscaler_scales_down_slowly_and_never_below_min() -> None:
    scaler = Autoscaler(2, 8, current=6, down_hold=10, cooldown_s=0.0)
    idle = m(alive=6)
    out = run(scaler, [idle] * 9)
    assert out == [None] * 9                     # nine idle seconds are not enough
    assert scaler.observe(idle, 9) == 3
    out = run(Autoscaler(2, 8, current=3, down_hold=1, cooldown_s=0.0), [m(alive=3)] * 3)
    assert out == [2, None, None]                # down to MIN, then it stays


def test_autoscaler_flapping_input_does_nothing() -> None:
    scaler = Autoscaler(1, 8, current=3, up_hold=2, down_hold=3, cooldown_s=0.0)
    up, down = m(alive=3, busy=3, queue=10), m(alive=3)
    assert run(scaler, [up, down] * 10) == [None] * 20


def test_autoscaler_clamps_to_range_at_once_and_caps_at_max() -> None:
    assert Autoscaler(2, 4, current=1).observe(m(alive=1), 0) == 2
    assert Autoscaler(2, 4, current=6).observe(m(alive=6, busy=6, queue=9), 0) == 4
    scaler = Autoscaler(1, 4, current=3, up_hold=1)
    assert scaler.observe(m(alive=3, busy=3, queue=500, rate=3.0), 0) == 4
    assert scaler.observe(m(alive=4, busy=4, queue=500, rate=4.0), 100) is None  # at MAX
    assert scaler.last["action"] == SCALE_UP


def test_autoscaler_starts_from_live_count_when_not_told() -> None:
    scaler = Autoscaler(1, 5, up_hold=1)
    assert scaler.observe(m(alive=2, busy=2, queue=9), 0) == 3
    with pytest.raises(ValueError, match="MIN <= MAX"):
        Autoscaler(3, 2)
