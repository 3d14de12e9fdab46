"""The collapse-diagnostics report of a run folder (``rtl diagnose RUN_DIR``).

Reads what ``rtl demo`` / ``rtl prune`` (or your own code) wrote: ``tickets/sparsity_XX/`` (saved tickets),
``results.json`` (ticket names, retrained metrics) and ``sweep.json`` (a :class:`rtl_plugin.diagnostics.sweep.Sweep`).
A folder holding one saved TicketSet (``masks.safetensors`` + ``manifest.json``) works too. Writes into
``RUN_DIR/diagnostics/``: figures (similarity and metric vs sparsity with the predicted collapse point, Jaccard
heatmaps per depth band, a ticket dendrogram, per-layer density per ticket), ``report.md`` and a
self-contained ``report.html`` (figures embedded), and ``diagnostics.json``; returns a short text summary.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from rtl_plugin.diagnostics import plots
from rtl_plugin.diagnostics.collapse import CollapseMonitor
from rtl_plugin.diagnostics.semantic import semantic_alignment, wordnet_similarity
from rtl_plugin.diagnostics.similarity import diagnose
from rtl_plugin.diagnostics.sweep import Sweep
from rtl_plugin.errors import RTLError
from rtl_plugin.persist.io import atomic_write_json, load_tickets


def _ticket_folders(run: Path) -> list[tuple[float | None, Path]]:
    if (run / "tickets").is_dir():
        out = []
        for f in sorted((run / "tickets").glob("sparsity_*")):
            try:
                s = json.loads((f / "manifest.json").read_text()).get("extra", {}).get("sparsity")
            except (OSError, ValueError):
                s = None
            out.append((s, f))
        return out
    if (run / "manifest.json").is_file():
        return [(None, run)]
    return []


def _retrained(results: dict | None, metric: str) -> list[dict]:
    if not results:
        return []
    rows = [r for r in results.get("rows", []) if r.get("method") == "rtl" and r.get("routing") in ("context", "all")]
    return sorted(({"sparsity": r["sparsity"], metric: r["metrics"][metric]} for r in rows
                   if metric in r.get("metrics", {})), key=lambda d: d["sparsity"])


def _inside(path, run) -> str:
    """``path`` relative to the run folder when it lies inside it (the folder can then be moved)."""
    path, run = Path(path).resolve(), Path(run).resolve()
    return path.relative_to(run).as_posix() if path.is_relative_to(run) else str(path)


def diagnose_run(run_dir, *, out_dir=None, class_similarity=None, wordnet: bool = False, metric: str = "balanced_accuracy",
                 monitor=None, figures: bool = True) -> dict:
    """Diagnose a run folder; returns ``{"summary": str, "report_md", "report_html", "figures", ...}``.

    Args:
        class_similarity: optional [K, K] class similarity (list of lists / tensor) for semantic alignment.
        wordnet: build the class similarity from WordNet with the ticket names (``apt-get install wordnet-base``).
        monitor: a CollapseMonitor (default settings when None) applied to the run's sweep.
    """

    run = Path(run_dir)
    if not run.is_dir():
        raise RTLError(f"{run} is not a folder; pass a run folder written by `rtl demo` / `rtl prune`.")
    folders = _ticket_folders(run)
    sweep_file = run / "sweep.json"
    if not folders and not sweep_file.is_file():
        raise RTLError(f"{run} holds no saved tickets (tickets/sparsity_*/ or manifest.json) and no sweep.json; "
                       "pass a run folder written by `rtl demo` / `rtl prune`.")
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    out = Path(out_dir) if out_dir is not None else run / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    names = (results or {}).get("ticket_names")

    per_sparsity, last = [], None
    for s, f in folders:
        ts = load_tickets(f)
        d = diagnose(ts)
        names = names or [str(k) for k in range(ts.num_tickets)]
        entry = {"folder": _inside(f, run), "sparsity": s if s is not None else float(ts.sparsity().mean()), "diagnosis": d.to_dict()}
        if class_similarity is not None or wordnet:
            S = wordnet_similarity(names) if class_similarity is None else class_similarity
            entry["semantic_alignment"] = semantic_alignment(ts, S)
        per_sparsity.append((entry, ts, d))
        last = (entry, ts, d)

    sweep = Sweep.load(sweep_file) if sweep_file.is_file() else None
    warning = None
    if sweep is not None:
        mon = monitor or CollapseMonitor()
        warning = mon.scan(sweep)
    truth = _retrained(results, metric)

    figs: list[str] = []
    if figures:
        if sweep is not None:
            figs.append(plots.plot_sweep(sweep, out / "sweep.png", warning=None if warning is None else warning.to_dict(),
                                         truth=truth or None))
        if last is not None:
            entry, ts, d = last
            pct = f"{100 * entry['sparsity']:.0f}"
            figs.append(plots.plot_band_heatmaps(ts, names, out / f"jaccard_bands_{pct}.png",
                                                 title=f"ticket Jaccard per depth band at {pct}% sparsity"))
            if ts.num_tickets >= 2:
                figs.append(plots.plot_dendrogram(d.jaccard, names, out / f"dendrogram_{pct}.png",
                                                  title=f"tickets at {pct}% sparsity (average linkage)"))
            figs.append(plots.plot_layer_sparsity(ts, names, out / f"layer_density_{pct}.png",
                                                  title=f"per-layer density per ticket at {pct}% sparsity"))

    summary = _summary(per_sparsity, sweep, warning, names)
    data = {"run": Path(run).name, "ticket_names": names, "per_sparsity": [e for e, _, _ in per_sparsity],
            "collapse_warning": None if warning is None else warning.to_dict(),
            "sweep_points": 0 if sweep is None else len(sweep.points), "retrained": truth,
            "figures": [Path(f).name for f in figs]}
    atomic_write_json(out / "diagnostics.json", data)
    md = _markdown(data, summary, per_sparsity, sweep, warning, truth)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(md, out, [Path(f).name for f in figs]))
    return {**data, "summary": summary, "report_md": str(out / "report.md"), "report_html": str(out / "report.html"),
            "out_dir": str(out)}


def _summary(per_sparsity, sweep, warning, names) -> str:
    lines = []
    for entry, _, d in per_sparsity:
        lines.append(f"== {Path(entry['folder']).name} ({100 * entry['sparsity']:.1f}% sparsity)")
        lines.append(d.summary(names))
        sa = entry.get("semantic_alignment")
        if sa:
            lines.append("semantic alignment (Spearman rho, ticket Jaccard vs class similarity): " +
                         ", ".join(f"{k} {v['rho']:+.2f}" for k, v in sa.items()))
    if sweep is None:
        lines.append("no sweep.json: collapse monitor not applied (record one with SweepRecorder / rtl prune).")
    elif warning is None:
        lines.append(f"collapse monitor: no collapse predicted up to {100 * sweep.points[-1].sparsity:.1f}% sparsity "
                     f"({len(sweep.points)} sweep points).")
    else:
        lines.append(f"collapse monitor: COLLAPSE predicted at {100 * warning.sparsity:.1f}% sparsity "
                     f"(confidence {warning.confidence:.2f}): {'; '.join(warning.reasons)}")
    return "\n".join(lines)


def _markdown(data, summary, per_sparsity, sweep, warning, truth) -> str:
    md = [f"# RTL collapse diagnostics: `{data['run']}`", "", "```", summary, "```", ""]
    if per_sparsity:
        md += ["## Similarity per sparsity", "",
               "| sparsity | mean Jaccard | chance | " + " | ".join(per_sparsity[0][2].bands) +
               " | union | shared by all | private | S_k min / max |",
               "|---|---|---|" + "---|" * len(per_sparsity[0][2].bands) + "---|---|---|---|"]
        for entry, _, d in per_sparsity:
            md.append(f"| {100 * entry['sparsity']:.1f}% | {d.mean_jaccard:.3f} | {d.chance:.3f} | " +
                      " | ".join(f"{v:.3f}" for v in d.bands.values()) +
                      f" | {d.params['union']:,} | {d.params['shared_by_all']:,} | {d.params['private']:,} | "
                      f"{min(d.scores):.3f} / {max(d.scores):.3f} |")
        md.append("")
    if sweep is not None:
        md += ["## Sparsity sweep (label-free signals per pruning round)", "",
               "| round | sparsity | mean Jaccard | " + " | ".join(sweep.points[0].band_jaccard) +
               " | min layer density | prune agreement | trained metric |",
               "|---|---|---|" + "---|" * len(sweep.points[0].band_jaccard) + "---|---|---|"]
        f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        for p in sweep.points:
            md.append(f"| {p.round} | {100 * p.sparsity:.2f}% | {p.mean_jaccard:.3f} | " +
                      " | ".join(f(v) for v in p.band_jaccard.values()) +
                      f" | {p.min_layer_density:.4f} | {f(p.prune_agreement)} | {f(p.mean_metric)} |")
        md.append("")
        md.append("Predicted collapse: " + ("none" if warning is None else
                                           f"**{100 * warning.sparsity:.1f}%** (confidence {warning.confidence:.2f})"))
        md.append("")
    if truth:
        md += ["## Retrained RTL metric", "", "| sparsity | " + " | ".join(k for k in truth[0] if k != "sparsity") + " |",
               "|---|" + "---|" * (len(truth[0]) - 1)]
        for t in truth:
            md.append(f"| {100 * t['sparsity']:.1f}% | " + " | ".join(f"{v:.4f}" for k, v in t.items() if k != "sparsity")
                      + " |")
        md.append("")
    if data["figures"]:
        md += ["## Figures", ""] + [f"![{f}]({f})" for f in data["figures"]] + [""]
    return "\n".join(md)


def _html(md: str, out: Path, figures: list[str]) -> str:
    """A self-contained HTML page: the Markdown as preformatted text and tables, the figures embedded."""
    body = []
    in_table = in_pre = False
    for line in md.splitlines():
        if line.startswith("|") and set(line.replace("|", "").strip()) <= set("-: "):
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip().replace("**", "")) for c in line.strip("|").split("|")]
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            if name in figures:
                b64 = base64.b64encode((out / name).read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"></p>')
        elif line == "```":
            body.append("</pre>" if in_pre else "<pre>")
            in_pre = not in_pre
        elif in_pre:
            body.append(html.escape(line))
        elif line:
            body.append(html.escape(line) + "<br>")
    if in_table:
        body.append("</table>")
    text = "\n".join(body).replace("<pre>\n", "<pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>RTL diagnostics</title><style>{style}</style>" \
           f"</head><body>\n{text}\n</body></html>\n"
