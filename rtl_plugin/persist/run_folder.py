"""A run folder of ``rtl demo`` / ``rtl prune``: ``results.json`` and the ticket folders it names.

``results.json`` names each sparsity's saved tickets by a path relative to the run folder
(``"tickets/sparsity_50"``), so a run folder can be moved or copied. Files written before that stored absolute
paths; such an entry is looked up by its folder name in this run folder's ``tickets/``, never at the old place.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePath

from rtl_plugin.errors import CorruptFileError

RESULTS = "results.json"
TICKETS_DIR = "tickets"


def read_results(run) -> dict:
    """The parsed ``results.json`` of the run folder ``run``."""
    run = Path(run)
    f = run / RESULTS
    if not f.is_file():
        raise CorruptFileError(f"{run} has no {RESULTS}; pass a run folder written by `rtl demo` / `rtl prune`.")
    try:
        results = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{f} is not valid JSON ({e}); the run folder is damaged: rerun it or restore "
                               "results.json from a backup.") from e
    if not isinstance(results, dict):
        raise CorruptFileError(f"{f} is not a JSON object; the run folder is damaged: rerun it.")
    return results


def ticket_folder(run, entry: str) -> Path:
    """The folder inside ``run`` that a ``results.json`` ticket entry names (relative, or an old absolute path)."""
    run = Path(run)
    if not isinstance(entry, str) or not entry:
        raise CorruptFileError(f"{run / RESULTS} has a ticket entry {entry!r}, not a folder path; rerun the run.")
    path = PurePath(entry)
    if path.is_absolute():  # written before run folders were self-contained: the same name in this run
        folder = run / TICKETS_DIR / path.name
    elif ".." in path.parts:
        raise CorruptFileError(f"{run / RESULTS} names the ticket folder {entry!r} outside the run folder; "
                               "ticket folders live in the run's tickets/: rerun the run.")
    else:
        folder = run / path
    if not folder.is_dir():
        raise CorruptFileError(f"{run / RESULTS} names the ticket folder {entry!r}, but {folder} does not exist; "
                               f"copy or move the whole run folder (with its {TICKETS_DIR}/), or rerun the run.")
    return folder


def saved_tickets(run, results: dict | None = None) -> dict[float, Path]:
    """Sparsity -> ticket folder (inside ``run``) for every sparsity whose tickets the run saved."""
    results = read_results(run) if results is None else results
    entries = results.get("tickets") or {}
    if not isinstance(entries, dict):
        raise CorruptFileError(f"{Path(run) / RESULTS} has a 'tickets' entry that is not a mapping; rerun the run.")
    try:
        return {float(s): ticket_folder(run, e) for s, e in entries.items()}
    except ValueError as e:
        raise CorruptFileError(f"{Path(run) / RESULTS} has a ticket sparsity that is not a number ({e}); "
                               "rerun the run.") from e


__all__ = ["RESULTS", "TICKETS_DIR", "read_results", "saved_tickets", "ticket_folder"]
