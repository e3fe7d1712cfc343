"""The grammars of the API's string parameters, each written once: the parser matches it and the OpenAPI states it.

A schema fuzzer (tests/service/test_fuzz.py) sends values the published pattern allows and values it forbids; the
server must take the first and refuse the second, so no parser here is looser or stricter than its pattern.
What no pattern can say (an index past the width of the layer a model really has) is a 404 naming the range.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from models.errors import InvalidArgument, NoSuchChannel
from models.explain import ALIASES, METHODS, PARAMS, Param
from models.resnet import WIDEST
from models.runs import RUN_ID_RE


def _digits(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}-{b}]"


def int_range_re(lo: int, hi: int) -> str:
    """A regex group matching the decimal integers lo..hi exactly (lo 0 or 1, hi < 1000; no sign, no leading 0)."""
    assert lo in (0, 1) and lo <= hi < 1000
    parts = [_digits(lo, min(hi, 9))]
    if hi >= 10:
        tens, units = (9, 9) if hi >= 99 else (hi // 10, hi % 10)
        if tens > 1:
            parts.append(f"{_digits(1, tens - 1)}[0-9]")
        parts.append(f"{tens}{_digits(0, units)}")
    if hi >= 100:
        h, t, u = hi // 100, hi // 10 % 10, hi % 10
        if h > 1:
            parts.append(f"{_digits(1, h - 1)}[0-9]{{2}}")
        if t:
            parts.append(f"{h}{_digits(0, t - 1)}[0-9]")
        parts.append(f"{h}{t}{_digits(0, u)}")
    return "(?:" + "|".join(parts) + ")"


CHANNEL_RE = int_range_re(0, WIDEST - 1)  # a channel index: 0..511
COUNT_RE = int_range_re(1, WIDEST)  # top:N: 1..512
CHANNELS_PATTERN = rf"^(?:all|top:{COUNT_RE}|{CHANNEL_RE}(?:,{CHANNEL_RE}){{0,{WIDEST - 1}}})$"
CHANNEL_LIST_PATTERN = (
    rf"^(?:all|{CHANNEL_RE}(?:,{CHANNEL_RE}){{0,{WIDEST - 1}}})$"  # where there is no image to rank by
)
CHANNELS_HELP = (
    f"`all`, a comma-separated list of indices (`3,17,42`; 0..{WIDEST - 1}, at most {WIDEST}), or `top:N` "
    f"(N 1..{WIDEST}: the N channels with the strongest activation, strongest first; all of them if the layer "
    "has fewer)"
)
MAX_CHANNELS_CHARS = 4 * WIDEST

MODEL_ID_PATTERN = RUN_ID_RE.pattern
MODEL_PAIR_PATTERN = f"^{MODEL_ID_PATTERN[1:-1]},{MODEL_ID_PATTERN[1:-1]}$"

_CHANNELS = re.compile(CHANNELS_PATTERN)


def parse_channels(spec: str) -> Literal["all"] | int | list[int]:
    """`all` | `top:N` | `3,17,42` -> what models.reverse.select_channels takes; 422 for anything else."""
    if not _CHANNELS.fullmatch(spec):
        raise InvalidArgument(f"channels must be {CHANNELS_HELP}; got {spec[:80]!r}")
    if spec == "all":
        return "all"
    if spec.startswith("top:"):
        return int(spec[4:])
    return [int(p) for p in spec.split(",")]


def _longest_first(names: list[str]) -> str:
    # Alternation is ordered: a longer name must be tried before a prefix of it (gradcampp before gradcam).
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_METHOD = f"(?:{_longest_first([*METHODS, *ALIASES])})"
METHODS_PATTERN = f"^(?:all|{_METHOD}(?:,{_METHOD}){{0,{len(METHODS) - 1}}})$"
_METHODS = re.compile(METHODS_PATTERN)
TARGET_PATTERN = r"^(?:predicted|[0-9]{1,4}|[A-Za-z][A-Za-z0-9 _-]{0,63})$"
_TARGET = re.compile(TARGET_PATTERN)


def parse_methods(spec: str) -> list[str]:
    """`all` or a comma list of method names (aliases allowed) -> the names as given; 422 for anything else."""
    if not _METHODS.fullmatch(spec):
        raise InvalidArgument(
            f"method: `all` or one or more of {', '.join(METHODS)}, comma-separated; got {spec[:80]!r}"
        )
    return list(METHODS) if spec == "all" else spec.split(",")


def parse_target(spec: str | None, classes: list[str]) -> int | None:
    """A class name or index, or None (the predicted class); a class the model lacks is a 404 naming its classes."""
    if spec is None or spec == "predicted":
        return None
    if not _TARGET.fullmatch(spec):
        raise InvalidArgument(f"target must be `predicted`, a class index or a class name; got {spec[:40]!r}")
    if spec.isdigit():
        if int(spec) >= len(classes):
            raise NoSuchChannel(f"target {spec} is out of range; classes are 0..{len(classes) - 1}")
        return int(spec)
    lowered = [c.lower() for c in classes]
    if spec.lower() not in lowered:
        raise NoSuchChannel(f"target {spec!r} is not a class of this model; classes: {', '.join(classes)}")
    return lowered.index(spec.lower())


def _param_schema(p: Param) -> dict[str, Any]:
    if isinstance(p.default, str):
        return {"type": "string", "enum": list(p.choices), "default": p.default}
    kind = "integer" if isinstance(p.default, int) else "number"
    return {"type": kind, "minimum": p.lo, "maximum": p.hi, "default": p.default}


def explain_params_schema() -> dict[str, Any]:
    """The JSON schema of /explain's `params` object, from models.explain.PARAMS (names, types, bounds)."""
    props = {
        m: {
            "type": "object",
            "properties": {k: _param_schema(p) for k, p in specs.items()},
            "additionalProperties": False,
        }
        for m, specs in PARAMS.items()
    }
    return {"type": "object", "properties": props, "additionalProperties": False}
