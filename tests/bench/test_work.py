"""The per-image work: the naive Pillow script and imgpipe's decode → chain → encode."""

from __future__ import annotations

import pytest

from imgpipe.bench import work
from imgpipe.bench.images import generate
from imgpipe.core.errors import FilterError

OPS = "resize:w=160,h=90|blur:radius=2|brightness:factor=1.1|encode:format=jpeg,quality=85"


def test_naive_runs_effects_first_and_resize_last() -> None:
    plan = work.naive_plan(OPS)
    assert [s.name for s in plan] == ["blur", "brightness", "resize", "encode"]


def test_naive_refuses_a_filter_it_has_no_pillow_version_of() -> None:
    with pytest.raises(work.NaiveUnsupported, match="edges"):
        work.naive_plan("edges|resize:w=10")


@pytest.mark.parametrize("ops", [OPS, "resize:w=100", "resize:w=160,h=160,fit=cover|grayscale"])
def test_naive_and_imgpipe_make_the_same_size(ops: str) -> None:
    data = generate(1, (320, 180))[0]
    a = work.out_size(work.naive(data, work.naive_plan(ops)))
    b = work.out_size(work.imgpipe_one(data, ops))
    assert a == b
    assert a is not None


def test_imgpipe_one_uses_a_reduced_decode_and_reports_stages() -> None:
    data = generate(1, (640, 360))[0]
    stages = work.stage_times(data, OPS)
    assert "decode(reduce=4)" in stages
    assert {"probe", "0:resize", "1:blur", "2:brightness", "encode"} <= set(stages)
    assert all(v >= 0 for v in stages.values())


def test_check_spec_canonicalises_and_refuses_bad_ops() -> None:
    assert work.check_spec("blur:radius=3").startswith("blur")
    with pytest.raises(FilterError):
        work.check_spec("nosuchfilter")


def test_out_size_of_garbage_is_none() -> None:
    assert work.out_size(b"not an image") is None


def test_timed_returns_the_output_and_a_duration() -> None:
    out, ms = work.timed(lambda d, a: d + a, b"x", b"y")
    assert out == b"xy"
    assert ms >= 0


def _mmapped_bytes_for_a_40mb_frame(tuned: bool) -> int:
    """In this (fresh) process: bytes glibc serves by mmap while a 40 MB frame lives."""
    import ctypes

    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    if tuned:
        work.single_thread_init()
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    frame = np.empty(40_000_000, np.uint8)
    frame[::4096] = 1
    return int(mallinfo2().hblkhd)


@pytest.mark.parametrize("tuned", [False, True])
def test_bench_processes_keep_frames_in_the_heap_as_the_services_do(tuned: bool) -> None:
    # The limit and pool processes run single_thread_init: the services' heap settings,
    # so a frame is not a fresh mmap (page faults, zeroing) in a mode and not in another.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        mapped = pool.apply(_mmapped_bytes_for_a_40mb_frame, (tuned,))
    assert (mapped < 40_000_000) is tuned
