"""Sweeps: a grid (cartesian product) or a list of rows of training configs, validated whole, and their records.

A sweep is planned before anything is queued: every row's config is validated and every error is named by row
and field, so a bad sweep leaves no trace. The record lies in the run store at `<home>/sweeps/<id>.json`; its
rows are ordinary runs named `<sweep id>-<row, 2 digits>`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.atomic import atomic_write_json
from models.config import TrainConfig
from models.errors import InvalidArgument
from models.runs import RunNotFound, new_run_id, validate_id

MAX_ROWS = 64
MAX_REPORTED_ERRORS = 20  # a 64-row sweep with one bad base value would otherwise list 64 copies
ECHO_CHARS = 200  # of a failing row's values, in its error
# 60, not 64: each row's run id appends "-NN" and run ids stop at 64 characters.
SWEEP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,59}$")
FIELDS = frozenset(TrainConfig.model_fields)

# The seed's Table 2 (Adam 1e-3, 20 epochs, the seed's stem: TrainConfig's defaults), one row per line, with the
# seed's reported accuracies beside each row so a sweep's table can show both.
_SEED_TABLE2: list[tuple[int, list[int], float, bool, float, float]] = [
    (100, [10, 15], 0.122, True, 0.8398, 0.8743),
    (100, [10, 15, 18], 0.5, True, 0.8418, 0.8839),
    (100, [10, 15, 18], 0.4, True, 0.8482, 0.8833),
    (100, [10, 15, 18], 0.4, False, 0.8230, 0.9945),
    (100, [10, 15, 18], 0.3, True, 0.8435, 0.8820),
    (100, [8, 10, 15], 0.4, True, 0.8162, 0.8564),
    (100, [8, 10, 15, 18], 0.5, True, 0.8392, 0.8724),
    (100, [8, 10, 15, 18], 0.4, True, 0.8367, 0.8729),
    (200, [10, 15, 18], 0.4, True, 0.8358, 0.8815),
]


@dataclass(frozen=True)
class SweepPreset:
    """A named sweep: a base config, explicit rows, and (optionally) the accuracies someone reported for them."""

    description: str
    base: dict[str, Any]
    rows: list[dict[str, Any]]
    reference: list[dict[str, float]] | None = None


SWEEP_PRESETS: dict[str, SweepPreset] = {
    "seed-table2": SweepPreset(
        description="the seed report's Table 2: batch size, milestones, gamma and augmentation (9 rows, 20 epochs)",
        base={},
        rows=[
            {"batch_size": b, "milestones": m, "gamma": g, "crop": a, "flip": a} for b, m, g, a, _, _ in _SEED_TABLE2
        ],
        reference=[{"test_acc": t, "train_acc": tr} for *_, t, tr in _SEED_TABLE2],
    ),
}

Values = Annotated[list[Any], Field(min_length=1, max_length=MAX_ROWS)]


def _spec_schema(schema: dict[str, Any]) -> None:
    """State in the published schema what plan() checks field by field: TrainConfig's fields, types and bounds in
    base, grid and rows, the preset names, and that a sweep names something to sweep (not preset and rows both).
    What no JSON Schema can say (rows x grid <= MAX_ROWS, a field set by both rows and grid) stays a 422."""
    fields = TrainConfig.model_json_schema()["properties"]
    partial = {"type": "object", "properties": fields, "additionalProperties": False}
    props = schema["properties"]
    props["base"] = {**props["base"], **partial}
    props["grid"] = {
        **props["grid"],
        "properties": {
            k: {"type": "array", "items": v, "minItems": 1, "maxItems": MAX_ROWS} for k, v in fields.items()
        },
        "additionalProperties": False,
    }
    rows = {"type": "array", "items": partial, "minItems": 1, "maxItems": MAX_ROWS}
    props["rows"] = {**props["rows"], "anyOf": [rows, {"type": "null"}]}
    props["preset"] = {**props["preset"], "anyOf": [{"enum": list(SWEEP_PRESETS)}, {"type": "null"}]}
    named = {"type": "string"}
    schema["anyOf"] = [
        {"required": ["grid"], "properties": {"grid": {"minProperties": 1}}},
        {"required": ["rows"], "properties": {"rows": {"type": "array"}}},
        {"required": ["preset"], "properties": {"preset": named}},
    ]
    schema["not"] = {"required": ["preset", "rows"], "properties": {"preset": named, "rows": {"type": "array"}}}


class SweepSpec(BaseModel):
    """What POST /sweeps takes: a base config and a grid (cartesian product), explicit rows or a preset, or both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_spec_schema)

    base: dict[str, Any] = Field(default_factory=dict, max_length=64, description="fields every row shares")
    grid: dict[str, Values] = Field(
        default_factory=dict, max_length=32, description="field -> values; every combination is a row"
    )
    rows: list[dict[str, Any]] | None = Field(
        None, min_length=1, max_length=MAX_ROWS, description="explicit rows (each a set of fields), times the grid"
    )
    preset: str | None = Field(None, description=f"a named sweep: {', '.join(SWEEP_PRESETS)}")
    id: str | None = Field(None, pattern=SWEEP_ID_RE.pattern, description="name the sweep (1-60 characters)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in SWEEP_PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(SWEEP_PRESETS)}")
        return v


@dataclass(frozen=True)
class PlannedRow:
    """One row of a sweep: the fields it sets (on top of the base), its validated config, the reported numbers."""

    values: dict[str, Any]
    config: TrainConfig
    reference: dict[str, float] | None = None


class SweepInvalid(InvalidArgument):
    """A sweep that cannot be queued; `errors` name each problem's place (`loc`) and row like FastAPI's 422s."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors))


class SweepNotFound(RunNotFound):
    """No sweep with that id in the run store."""


def _error(loc: list[Any], msg: str, **extra: Any) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": "sweep", **extra}


def _unknown_fields(where: str, fields: Any, index: int | None = None) -> list[dict[str, Any]]:
    loc = [where] if index is None else [where, index]
    return [_error([*loc, f], f"unknown training config field {f!r}") for f in fields if f not in FIELDS]


def _check_shape(base: dict[str, Any], grid: dict[str, list[Any]], rows: list[dict[str, Any]]) -> None:
    """Unknown fields, rows and grid setting one field, and the row bound: before any combination is built."""
    errors = _unknown_fields("base", base) + _unknown_fields("grid", grid)
    for i, row in enumerate(rows):
        errors += _unknown_fields("rows", row, i)
    row_keys = {k for row in rows for k in row}
    errors += [_error(["grid", k], f"{k!r} is set both by rows and by the grid") for k in grid if k in row_keys]
    n = len(rows) * math.prod(len(v) for v in grid.values())
    if n > MAX_ROWS:
        sizes = " x ".join([*([str(len(rows))] if len(rows) > 1 else []), *(f"{len(v)} {k}" for k, v in grid.items())])
        errors.append(_error(["grid"], f"{n} rows ({sizes}) is more than the {MAX_ROWS} a sweep may have"))
    try:
        # The base on its own too: a value every row overrides is still a value the request gave.
        TrainConfig.model_validate({k: v for k, v in base.items() if k in FIELDS})
    except ValidationError as e:
        errors += [_error(["base", ".".join(map(str, err["loc"]))], err["msg"]) for err in e.errors()]
    if errors:
        raise SweepInvalid(errors[:MAX_REPORTED_ERRORS])


def _validate_row(i: int, base: dict[str, Any], values: dict[str, Any]) -> TrainConfig | list[dict[str, Any]]:
    """The row's config, or its errors named by row and field."""
    try:
        return TrainConfig.model_validate({**base, **values})
    except ValidationError as e:
        out = []
        for err in e.errors():
            # A check across fields has no loc: name the row's field its message names.
            named = next((k for k in [*values, *base] if k in err["msg"]), "config")
            field = ".".join(str(p) for p in err["loc"]) or named
            # The row's values as text, cut short: a 422 echoes little, and text always serialises (NaN too).
            shown = json.dumps(values, default=str)[:ECHO_CHARS]
            out.append(_error(["row", i, field], err["msg"], row=i, values=shown))
        return out


def plan(spec: SweepSpec) -> list[PlannedRow]:
    """Every row of the sweep, each config validated; SweepInvalid (naming row and field) if any is wrong."""
    preset = SWEEP_PRESETS[spec.preset] if spec.preset else None
    if preset and spec.rows is not None:
        raise SweepInvalid([_error(["rows"], "give rows or a preset, not both")])
    if preset is None and spec.rows is None and not spec.grid:
        raise SweepInvalid([_error([], "nothing to sweep: give a grid, rows or a preset")])
    base = {**(preset.base if preset else {}), **spec.base}
    rows = preset.rows if preset else (spec.rows or [{}])
    refs = preset.reference if preset and preset.reference else [None] * len(rows)
    _check_shape(base, spec.grid, rows)
    combos = [dict(zip(spec.grid, c, strict=True)) for c in itertools.product(*spec.grid.values())]
    planned: list[PlannedRow] = []
    errors: list[dict[str, Any]] = []
    for i, ((row, ref), combo) in enumerate(itertools.product(zip(rows, refs, strict=True), combos)):
        values = {**row, **combo}
        checked = _validate_row(i, base, values)
        if isinstance(checked, list):
            errors += checked
            planned.append(PlannedRow(values, TrainConfig(), None))  # keeps row numbering; never queued
        else:
            planned.append(PlannedRow(values, checked, ref))
    if errors:
        raise SweepInvalid(errors[:MAX_REPORTED_ERRORS])
    return planned


def varying_fields(rows: list[PlannedRow]) -> list[str]:
    """The fields the rows set, in the order they first appear (the table's leading columns)."""
    return list(dict.fromkeys(k for r in rows for k in r.values))


def row_run_id(sweep_id: str, index: int) -> str:
    """The run id of a sweep's row: `<sweep id>-NN`."""
    return f"{sweep_id}-{index:02d}"


def validate_sweep_id(sweep_id: str) -> str:
    """A sweep id: 1-60 characters, so `<id>-NN` is still a run id."""
    return validate_id(sweep_id, SWEEP_ID_RE, "sweep", 60)


def new_sweep_id() -> str:
    return "sweep-" + new_run_id()


def sweep_record(sweep_id: str, spec: SweepSpec, rows: list[PlannedRow]) -> dict[str, Any]:
    """What `<home>/sweeps/<id>.json` holds: the request, the varying fields, and each row's run id and values."""
    return {
        "id": sweep_id,
        "created": time.time(),
        "preset": spec.preset,
        "base": spec.base,
        "grid": spec.grid,
        "rows": spec.rows,
        "varying": varying_fields(rows),
        "runs": [
            {"id": row_run_id(sweep_id, i), "values": r.values, "reference": r.reference} for i, r in enumerate(rows)
        ],
    }


class SweepStore:
    """`<home>/sweeps/<id>.json`: one record per sweep, written atomically (the rows live in `<home>/runs`)."""

    def __init__(self, home: str | Path) -> None:
        self.dir = Path(home) / "sweeps"

    def path(self, sweep_id: str) -> Path:
        return self.dir / f"{validate_sweep_id(sweep_id)}.json"

    def exists(self, sweep_id: str) -> bool:
        return self.path(sweep_id).is_file()

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.path(record["id"]), record)

    def read(self, sweep_id: str) -> dict[str, Any]:
        """The record; SweepNotFound when there is none."""
        try:
            data: dict[str, Any] = json.loads(self.path(sweep_id).read_text())
        except FileNotFoundError as e:
            raise SweepNotFound(f"no sweep {sweep_id!r}; GET /sweeps lists them") from e
        return data

    def update(self, sweep_id: str, **fields: Any) -> dict[str, Any]:
        record = {**self.read(sweep_id), **fields}
        self.write(record)
        return record

    def list(self) -> list[dict[str, Any]]:
        """Every readable record, newest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("*.json"):
            if SWEEP_ID_RE.fullmatch(p.stem):
                try:
                    out.append(json.loads(p.read_text()))
                except (OSError, ValueError):
                    continue
        return sorted(out, key=lambda r: r.get("created", 0), reverse=True)
