from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imgpipe.core.config import Settings, add_settings_args, parse_range, settings_from_args
from imgpipe.core.errors import ConfigError


def test_defaults_validate_and_match_design() -> None:
    s = Settings().validate()
    assert s.gateway_port == 8000 and s.dashboard_port == 8501
    assert s.data_dir == Path("data")
    assert s.max_upload_bytes == 50 * 1024 * 1024 and s.max_pixels == 50_000_000
    assert (s.max_images, s.max_chains, s.max_filters, s.max_attempts) == (16, 16, 12, 3)
    assert s.shm_dir == Path("/dev/shm")


def test_from_env_parses_types() -> None:
    s = Settings.from_env({"IMGPIPE_GATEWAY_PORT": "9001", "IMGPIPE_DATA_DIR": "/tmp/x",
                           "IMGPIPE_TEST_HOOKS": "true", "IMGPIPE_TASK_TIMEOUT_S": "2.5",
                           "PATH": "/bin", "IMGPIPE_URL": "http://elsewhere",
                           "IMGPIPE_SHM_DIR": "/run/shm"})
    assert s.gateway_port == 9001 and s.data_dir == Path("/tmp/x")
    assert s.shm_dir == Path("/run/shm")
    assert {"variable": "IMGPIPE_SHM_DIR", "value": "/run/shm"}.items() <= next(
        d for d in s.describe() if d["variable"] == "IMGPIPE_SHM_DIR").items()
    assert s.test_hooks is True and s.task_timeout_s == 2.5


@pytest.mark.parametrize("env, needle", [
    ({"IMGPIPE_GATEWAY_PORT": "eighty"}, "IMGPIPE_GATEWAY_PORT"),
    ({"IMGPIPE_NO_SUCH_THING": "1"}, "IMGPIPE_NO_SUCH_THING is not a setting"),
    ({"IMGPIPE_TEST_HOOKS": "maybe"}, "IMGPIPE_TEST_HOOKS"),
])
def test_from_env_rejects_bad_values(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


@pytest.mark.parametrize("overrides, needle", [
    ({"gateway_port": 70000}, "port"),
    ({"max_images": 0}, "at least 1"),
    ({"task_timeout_s": 0.0}, "positive"),
    ({"light_task_endpoint": "http://x:1"}, "ZeroMQ URL"),
    ({"result_endpoint": "tcp://127.0.0.1"}, "give a port"),
    ({"worker_serves": "medium"}, "light, heavy or all"),
    ({"autoscale": "5:2"}, "MIN:MAX"),
    ({"max_message_bytes": 10}, "larger than IMGPIPE_MAX_UPLOAD_BYTES"),
    ({"curve_client_secret_file": "/k.key_secret"}, "server public key"),
    ({"store_url": "mysql://db/x"}, "postgresql://"),
    ({"store_pool_size": 0}, "at least 1"),
])
def test_validate_says_what_to_change(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings().with_overrides(**overrides).validate()


def test_env_round_trip_and_bind_url() -> None:
    s = Settings(test_hooks=True, workers=5, bind_host="0.0.0.0")
    assert Settings.from_env(s.to_env()) == s
    assert s.bind_url("tcp://ventilator:5551") == "tcp://*:5551"
    assert Settings().bind_url("tcp://ventilator:5551") == "tcp://127.0.0.1:5551"
    assert s.bind_url("ipc:///tmp/a") == "ipc:///tmp/a"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_GATEWAY_PORT", "9100")
    monkeypatch.setenv("IMGPIPE_WORKERS", "2")
    parser = argparse.ArgumentParser()
    add_settings_args(parser, "gateway_port", "workers", "data_dir")
    s = settings_from_args(parser.parse_args(["--port", "9200", "--data", "/tmp/d"]))
    assert s.gateway_port == 9200 and s.workers == 2 and s.data_dir == Path("/tmp/d")


def test_parse_range() -> None:
    assert parse_range("1:6") == (1, 6)
    assert parse_range("3:3") == (3, 3)
    for bad in ("0:2", "4:1", "x:2", "3", ""):
        assert parse_range(bad) is None


def test_the_store_url_is_shown_without_its_password() -> None:
    s = Settings(store_url="postgresql://imgpipe:s3cret@db:5432/jobs").validate()
    shown = next(d["value"] for d in s.describe() if d["variable"] == "IMGPIPE_STORE_URL")
    assert shown == "postgresql://imgpipe:***@db:5432/jobs"
    assert Settings.from_env(s.to_env()).store_url == s.store_url  # children get it whole
    assert Settings(store_url="postgres:///jobs?host=/run/pg").validate().store_url
