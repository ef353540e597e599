"""Presets (``IMGPIPE_PRESETS``): ``ops=preset:NAME`` through the HTTP API, and ``/api/presets``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from imgpipe.core.config import Settings
from imgpipe.core.errors import ConfigError
from imgpipe.gateway.presets import load_presets
from tests.gateway import images as im

THUMB = "resize:w=320,h=320,fit=cover,gravity=smart|encode:format=auto"
PRESETS = f"""# imgpipe presets
thumb={THUMB}

small = resize:w=64
"""


@pytest.fixture
def preset_gateway(settings: Settings, make_gateway: Any, tmp_path: Path) -> Any:
    path = tmp_path / "presets.txt"
    path.write_text(PRESETS)
    return make_gateway(dataclasses.replace(settings, presets=str(path)))


def test_presets_are_listed(preset_gateway: Any) -> None:
    res = preset_gateway.client.simulate_get("/api/presets")
    assert res.status_code == 200
    assert res.json == {"presets": [{"name": "small", "ops": "resize:w=64"},
                                    {"name": "thumb", "ops": THUMB}]}


def test_no_presets_file_lists_none(gateway: Any) -> None:
    assert gateway.client.simulate_get("/api/presets").json == {"presets": []}


@pytest.mark.parametrize(
    ("accept", "recorded"),
    [
        ("image/avif,image/webp,*/*", "resize:w=320,h=320,fit=cover,gravity=smart"
                                      "|encode:format=avif"),
        (None, "resize:w=320,h=320,fit=cover,gravity=smart|encode"),
    ],
)
def test_a_preset_is_expanded_and_recorded(preset_gateway: Any, accept: str | None,
                                           recorded: str) -> None:
    body, ctype = im.multipart([im.jpeg()], ["preset:thumb", "preset:small"])
    res = preset_gateway.post(body, ctype, headers={"Accept": accept} if accept else None)
    assert res.status_code == 202, res.text
    assert [o["ops"] for o in res.json["outputs"]] == [recorded, "resize:w=64"]


def test_an_unknown_preset_is_400_naming_it(preset_gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["preset:huge"])
    res = preset_gateway.post(body, ctype)
    assert res.status_code == 400
    assert res.json["field"] == "ops"
    assert "unknown preset 'huge'" in res.json["detail"]
    assert "small, thumb" in res.json["detail"]
    assert preset_gateway.store.totals().jobs == 0


def test_presets_are_whole_chains_not_steps(preset_gateway: Any) -> None:
    body, ctype = im.multipart([im.jpeg()], ["invert|preset:small"])
    res = preset_gateway.post(body, ctype)
    assert res.status_code == 400 and res.json["field"] == "ops"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("thumb resize:w=3\n", "write name=chain"),
        ("a=resize:w=3\na=invert\n", "defined twice"),
        ("a=blur:radius=-1\n", "preset 'a'"),
        ("bad name=invert\n", "write name=chain"),
    ],
)
def test_a_bad_presets_file_is_a_config_error_naming_the_line(
        tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_presets(str(path))
    assert f"{path}:" in str(info.value.detail)


def test_a_missing_presets_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_presets(str(tmp_path / "nope.txt"))


def test_the_setting_comes_from_the_environment() -> None:
    s = Settings.from_env({"IMGPIPE_PRESETS": "/etc/imgpipe/presets.txt"})
    assert s.presets == "/etc/imgpipe/presets.txt"
