"""persist.run_folder: results.json ticket entries resolve inside the run folder, wherever it lies."""
from __future__ import annotations

import json

import pytest

import rtl_plugin as rtl
from rtl_plugin.persist.run_folder import read_results, saved_tickets, ticket_folder


def _run(tmp_path, tickets: dict):
    run = tmp_path / "run"
    for name in ("sparsity_50", "sparsity_75"):
        (run / "tickets" / name).mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"tickets": tickets}))
    return run


def test_relative_and_old_absolute_entries(tmp_path):
    run = _run(tmp_path, {"0.5": "tickets/sparsity_50", "0.75": "/somewhere/deleted/run/tickets/sparsity_75"})
    assert saved_tickets(run) == {0.5: run / "tickets" / "sparsity_50", 0.75: run / "tickets" / "sparsity_75"}
    assert read_results(run)["tickets"]["0.5"] == "tickets/sparsity_50"


@pytest.mark.parametrize("entry, needle", [
    ("tickets/sparsity_90", "does not exist"),
    ("/old/place/tickets/sparsity_90", "does not exist"),
    ("../other_run/tickets/sparsity_50", "outside the run folder"),
    ("", "not a folder path"),
    (3, "not a folder path"),
])
def test_bad_entries_raise(tmp_path, entry, needle):
    run = _run(tmp_path, {"0.5": entry})
    with pytest.raises(rtl.CorruptFileError, match=needle):
        saved_tickets(run)
    with pytest.raises(rtl.CorruptFileError, match=needle):
        ticket_folder(run, entry)


def test_damaged_results_json(tmp_path):
    with pytest.raises(rtl.CorruptFileError, match="no results.json"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(rtl.CorruptFileError, match="not valid JSON"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("[1]")
    with pytest.raises(rtl.CorruptFileError, match="not a JSON object"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"tickets": {"half": "tickets/sparsity_50"}}))
    (tmp_path / "tickets" / "sparsity_50").mkdir(parents=True)
    with pytest.raises(rtl.CorruptFileError, match="not a number"):
        saved_tickets(tmp_path)
