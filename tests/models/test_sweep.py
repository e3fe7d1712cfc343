"""Sweep planning: rows from a grid, explicit rows or a preset; every config validated; the record store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from models.config import TrainConfig
from models.errors import InvalidArgument
from models.runs import RUN_ID_RE, RunNotFound
from models.sweep import (
    MAX_ROWS,
    SweepInvalid,
    SweepSpec,
    SweepStore,
    plan,
    row_run_id,
    sweep_record,
    varying_fields,
)


def test_grid_is_the_cartesian_product_in_order() -> None:
    rows = plan(SweepSpec(base={"epochs": 3}, grid={"batch_size": [50, 100], "gamma": [0.1, 0.2, 0.3]}))
    assert [(r.values["batch_size"], r.values["gamma"]) for r in rows] == [
        (50, 0.1),
        (50, 0.2),
        (50, 0.3),
        (100, 0.1),
        (100, 0.2),
        (100, 0.3),
    ]
    assert all(r.config.epochs == 3 for r in rows) and rows[4].config == TrainConfig(
        epochs=3, batch_size=100, gamma=0.2
    )
    assert varying_fields(rows) == ["batch_size", "gamma"]


def test_rows_times_grid() -> None:
    rows = plan(SweepSpec(rows=[{"lr": 0.1}, {"lr": 0.01, "optimizer": "sgd"}], grid={"seed": [1, 2]}))
    assert [r.values for r in rows] == [
        {"lr": 0.1, "seed": 1},
        {"lr": 0.1, "seed": 2},
        {"lr": 0.01, "optimizer": "sgd", "seed": 1},
        {"lr": 0.01, "optimizer": "sgd", "seed": 2},
    ]
    assert varying_fields(rows) == ["lr", "seed", "optimizer"]


def test_seed_table2_preset_holds_the_nine_rows() -> None:
    rows = plan(SweepSpec(preset="seed-table2"))
    assert len(rows) == 9
    got = [(c.batch_size, c.milestones, c.gamma, c.crop and c.flip) for c in (r.config for r in rows)]
    assert got == [
        (100, [10, 15], 0.122, True),
        (100, [10, 15, 18], 0.5, True),
        (100, [10, 15, 18], 0.4, True),
        (100, [10, 15, 18], 0.4, False),
        (100, [10, 15, 18], 0.3, True),
        (100, [8, 10, 15], 0.4, True),
        (100, [8, 10, 15, 18], 0.5, True),
        (100, [8, 10, 15, 18], 0.4, True),
        (200, [10, 15, 18], 0.4, True),
    ]
    c = rows[0].config
    assert (c.optimizer, c.lr, c.epochs, c.arch) == ("adam", 1e-3, 20, "resnet18")  # the seed's recipe
    assert rows[3].reference == {"test_acc": 0.8230, "train_acc": 0.9945}
    # A base on top of the preset (a quick smoke run of the same table) keeps the rows.
    quick = plan(SweepSpec(preset="seed-table2", base={"epochs": 1, "train_limit": 100}))
    assert [r.config.epochs for r in quick] == [1] * 9 and quick[8].config.batch_size == 200


def _errors(spec: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(SweepInvalid) as e:
        plan(SweepSpec(**spec))
    return e.value.errors


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"grid": {"learning_rate": [0.1]}}, ["body", "grid", "learning_rate"]),
        ({"base": {"bogus": 1}, "grid": {"lr": [0.1]}}, ["body", "base", "bogus"]),
        ({"rows": [{"lr": 0.1}, {"momentun": 0.5}]}, ["body", "rows", 1, "momentun"]),
        ({"rows": [{"seed": 1}], "grid": {"seed": [2]}}, ["body", "grid", "seed"]),
        ({"grid": {"seed": list(range(8)), "lr": [0.1] * 9}}, ["body", "grid"]),
        ({"preset": "seed-table2", "rows": [{}]}, ["body", "rows"]),
        ({}, ["body"]),
    ],
)
def test_shape_errors_name_the_place(spec: dict[str, Any], loc: list[Any]) -> None:
    assert [e["loc"] for e in _errors(spec)] == [loc]


def test_bound_counts_rows_times_grid() -> None:
    assert len(plan(SweepSpec(grid={"seed": list(range(8)), "lr": [0.1] * 8}))) == MAX_ROWS
    err = _errors({"rows": [{}, {}], "grid": {"seed": list(range(33))}})
    assert "66 rows" in err[0]["msg"] and str(MAX_ROWS) in err[0]["msg"]


def test_a_failing_combination_is_named_by_row_and_field() -> None:
    errors = _errors({"grid": {"batch_size": [100, 5000], "milestones": [[10, 15], [15, 0]]}})
    where = sorted((e["row"], e["loc"][-1]) for e in errors)
    # rows: (100,[10,15]) ok; (100,[15,0]) milestones (no epoch 0); (5000,...) batch_size twice
    assert where == [(1, "milestones.1"), (2, "batch_size"), (3, "batch_size"), (3, "milestones.1")], errors
    assert errors[0]["values"] == '{"batch_size": 100, "milestones": [15, 0]}'


def test_request_level_errors() -> None:
    bads: list[dict[str, Any]] = [{"grid": {"lr": []}}, {"preset": "nope"}, {"id": "../x"}, {"id": "x" * 61}]
    bads.append({"rows": []})
    for bad in bads:
        with pytest.raises(ValidationError):
            SweepSpec(**bad)
    SweepSpec(id="x" * 60)  # the longest id still makes valid run ids
    assert RUN_ID_RE.fullmatch(row_run_id("x" * 60, MAX_ROWS - 1))


def test_store_round_trip_and_ids(tmp_path: Path) -> None:
    spec = SweepSpec(id="s1", grid={"seed": [1, 2]})
    rows = plan(spec)
    store = SweepStore(tmp_path)
    assert not store.exists("s1") and store.list() == []
    store.write(sweep_record("s1", spec, rows))
    rec = store.read("s1")
    assert [r["id"] for r in rec["runs"]] == ["s1-00", "s1-01"] and rec["varying"] == ["seed"]
    assert [r["values"] for r in rec["runs"]] == [{"seed": 1}, {"seed": 2}]
    assert not list((tmp_path / "sweeps").glob("*.tmp"))  # written by rename
    assert store.update("s1", note="x")["note"] == "x" and [r["id"] for r in store.list()] == ["s1"]
    with pytest.raises(RunNotFound):
        store.read("nope")
    for bad in ("../etc", "a/b", "", "-x"):
        with pytest.raises(InvalidArgument):
            store.path(bad)
