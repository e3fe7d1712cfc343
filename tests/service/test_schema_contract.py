"""The published OpenAPI says what the server accepts: grammars from the parsers' own patterns, security only when
keys exist, a 405's Allow naming every method on the path, and the model's own default layer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import InvalidArgument
from service.grammar import (
    CHANNEL_RE,
    CHANNELS_PATTERN,
    COUNT_RE,
    METHODS_PATTERN,
    MODEL_ID_PATTERN,
    int_range_re,
    parse_channels,
    parse_methods,
)
from tests.service.conftest import make_client


@pytest.mark.parametrize("lo", [0, 1])
@pytest.mark.parametrize("hi", [1, 9, 10, 19, 63, 64, 99, 100, 127, 255, 511, 512, 999])
def test_int_range_re_matches_exactly_lo_to_hi(lo: int, hi: int) -> None:
    if hi < lo:
        return
    rx = re.compile(int_range_re(lo, hi))
    assert [i for i in range(1100) if rx.fullmatch(str(i))] == list(range(lo, hi + 1))
    assert not rx.fullmatch("0" + str(hi)) and not rx.fullmatch("-1") and not rx.fullmatch("+1")


def test_channel_and_count_bounds() -> None:
    assert re.fullmatch(CHANNEL_RE, "511") and not re.fullmatch(CHANNEL_RE, "512")
    assert re.fullmatch(COUNT_RE, "512") and not re.fullmatch(COUNT_RE, "0")


@settings(max_examples=300, deadline=None)
@given(st.from_regex(CHANNELS_PATTERN, fullmatch=True))
def test_every_value_the_channels_pattern_allows_parses(spec: str) -> None:
    parsed = parse_channels(spec)
    assert parsed == "all" or isinstance(parsed, int | list)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789,:atopl lA-", max_size=12))
def test_the_channels_parser_refuses_exactly_what_the_pattern_refuses(spec: str) -> None:
    allowed = re.fullmatch(CHANNELS_PATTERN, spec) is not None
    try:
        parse_channels(spec)
        accepted = True
    except InvalidArgument:
        accepted = False
    assert accepted == allowed, spec


@settings(max_examples=200, deadline=None)
@given(st.from_regex(METHODS_PATTERN, fullmatch=True))
def test_every_value_the_methods_pattern_allows_parses(spec: str) -> None:
    assert parse_methods(spec)


def _security(schema: dict) -> list:  # type: ignore[type-arg]
    return [op.get("security") for ops in schema["paths"].values() for op in ops.values() if op.get("security")]


def test_security_schemes_only_when_a_key_is_configured(home: Path) -> None:
    with make_client(home) as client:
        open_schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_schema.get("components", {}) and _security(open_schema) == []
    with make_client(home, api_key=["k1"]) as client:
        keyed = client.get("/openapi.json").json()
        assert client.post("/train", json={}).status_code == 401
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert keyed["paths"]["/train"]["post"]["security"] and "401" in keyed["paths"]["/train"]["post"]["responses"]


def test_a_405_allows_every_method_the_path_serves(home: Path) -> None:
    with make_client(home) as client:
        r = client.request("OPTIONS", "/jobs/tiny")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET" and r.json()["detail"]
        assert client.put("/models/tiny/default").headers["allow"] == "POST"
        assert client.delete("/predict").headers["allow"] == "POST"


def test_grammars_are_in_the_schema(home: Path) -> None:
    with make_client(home) as client:
        schema = client.get("/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/featuremaps"]["post"]["parameters"]}
    assert params["channels"]["schema"]["pattern"] == CHANNELS_PATTERN
    assert "layer4" in params["layer"]["schema"]["enum"] and "conv5_x" in params["layer"]["schema"]["enum"]
    assert params["model"]["schema"]["pattern"] == MODEL_ID_PATTERN  # beside anyOf: it constrains the string
    explain = {p["name"]: p for p in schema["paths"]["/explain"]["post"]["parameters"]}
    occlusion = explain["params"]["content"]["application/json"]["schema"]["properties"]["occlusion"]
    assert occlusion["properties"]["patch"] == {"type": "integer", "minimum": 1, "maximum": 32, "default": 8}
    filters = {p["name"]: p for p in schema["paths"]["/filters"]["get"]["parameters"]}
    assert "layer4.0.downsample.0" in filters["layer"]["schema"]["enum"]


def test_a_channel_the_layer_lacks_is_404_a_malformed_one_422(home: Path, test_pngs: list[bytes]) -> None:
    files = {"file": ("x.png", test_pngs[0], "image/png")}
    with make_client(home) as client:
        r = client.post("/featuremaps", params={"layer": "conv1", "channels": "100"}, files=files)
        assert r.status_code == 404 and "0..63" in r.json()["detail"], r.text
        r = client.post("/featuremaps", params={"layer": "conv1", "channels": "600"}, files=files)
        assert r.status_code == 422, r.text
        r = client.post("/featuremaps", params={"layer": "conv1", "channels": "top:500", "format": "json"}, files=files)
        assert r.status_code == 200 and len(r.headers["x-convlens-channels"].split(",")) == 64  # all there are


def test_models_state_their_default_layer(home: Path) -> None:
    with make_client(home) as client:
        assert client.get("/models/tiny").json()["cam_layer"] == "layer2"  # the seed stem at 32px: layer2 is 4x4
