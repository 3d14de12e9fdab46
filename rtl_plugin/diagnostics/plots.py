"""Figures (matplotlib, imported lazily; headless 'Agg' backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rtl_plugin.diagnostics.similarity import jaccard_per_band
from rtl_plugin.errors import MissingDependencyError


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError('matplotlib is required for figures: pip install "rtl-plugin[plots]"') from e
    return plt



def _save(fig, path) -> str:
    """Lay out, write (120 dpi) and close ``fig``; returns the path as a string."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return str(path)


def plot_metric_vs_sparsity(results: dict, path, metric: str = "balanced_accuracy") -> str:
    """One line per (method, routing, matching); dense as a horizontal line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict = {}
    for r in results["rows"]:
        key = (r["method"], r["routing"], r.get("matching", "equal_cost"))
        series.setdefault(key, []).append((r["sparsity"], r["metrics"][metric]))
    for key, pts in series.items():
        pts.sort()
        label = key[0] + ("" if key[1] in ("none", "context") else f" ({key[1]} router)") + \
            (" [equal storage]" if key[2] == "equal_storage" else "")
        if key[0] == "dense":
            ax.axhline(pts[0][1], color="gray", ls="--", label="dense")
            continue
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                lw=2.5 if key[0] == "rtl" else 1.2)
    ax.set_xlabel("sparsity (%) of each ticket / single mask")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{results.get('dataset', '')}: {results.get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_params(results: dict, path) -> str:
    """Stored prunable weights per method and sparsity (log scale)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict = {}
    for r in results["rows"]:
        if r["method"] == "dense" or r.get("routing") not in ("context", "none") or r.get("matching") == "equal_storage":
            continue
        series.setdefault(r["method"], {})[r["sparsity"]] = r["params"]
    for m, d in series.items():
        xs = sorted(d)
        ax.plot([100 * x for x in xs], [d[x] for x in xs], marker="s", label=m)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("stored prunable weights")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_jaccard(jaccard, names, path, title: str = "") -> str:
    """Heatmap of pairwise ticket Jaccard similarity."""
    plt = _plt()
    j = np.asarray(jaccard, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(names), 1.0 + 0.5 * len(names)))
    im = ax.imshow(j, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for a in range(len(names)):
        for b in range(len(names)):
            ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if j[a, b] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_classification_results(results: dict, out_dir) -> list[str]:
    """All figures of a classification run; returns their paths (relative names)."""
    out_dir = Path(out_dir)
    figs = [plot_metric_vs_sparsity(results, out_dir / "balanced_accuracy.png"),
            plot_metric_vs_sparsity(results, out_dir / "auc.png", metric="auc"),
            plot_params(results, out_dir / "params.png")]
    for sim in results.get("similarity", []):
        s = int(round(sim["sparsity"] * 100))
        figs.append(plot_jaccard(sim["jaccard"], results.get("ticket_names", []),
                                 out_dir / f"jaccard_{s:02d}.png", title=f"ticket Jaccard at {s}% sparsity"))
    return [Path(f).name for f in figs]


# ------------------------------------------------------------------------------ collapse diagnostics
def plot_sweep(sweep, path, *, warning=None, truth: list[dict] | None = None, title: str = "") -> str:
    """Similarity (global, per depth band, chance) and metric vs sparsity along a sweep; the predicted
    collapse point as a red dashed line. ``truth``: optional ``[{"sparsity", <metric>}]`` after retraining."""
    plt = _plt()
    pts = sweep.points
    xs = [100 * p.sparsity for p in pts]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6.8, 6.2), sharex=True)
    a1.plot(xs, [p.mean_jaccard for p in pts], "k-o", lw=2, ms=3, label="mean Jaccard (all weights)")
    for band in (pts[0].band_jaccard if pts else {}):
        a1.plot(xs, [p.band_jaccard.get(band) for p in pts], "-s", ms=3, label=f"{band} layers")
    a1.plot(xs, [p.chance for p in pts], ":", color="gray", label="chance (random masks)")
    a1.set_ylabel("pairwise ticket Jaccard")
    a1.set_ylim(-0.02, 1.02)
    a2_has = False
    met = [(100 * p.sparsity, p.mean_metric) for p in pts if p.mean_metric is not None]
    if met:
        a2.plot(*zip(*met), "b-o", ms=3, label="trained ticket metric (mean over tickets, before retraining)")
        a2_has = True
    if truth:
        keys = [k for k in truth[0] if k != "sparsity"]
        if keys:
            a2.plot([100 * t["sparsity"] for t in truth], [t[keys[0]] for t in truth], "g-D", ms=4,
                    label=f"after joint retraining ({keys[0].replace('_', ' ')})")
            a2_has = True
    agr = [(100 * p.sparsity, p.prune_agreement) for p in pts if p.prune_agreement is not None]
    if agr:
        a2.plot(*zip(*agr), "--", color="purple", ms=3, label="prune agreement (label-free)")
        a2_has = True
    for ax in (a1, a2):
        if warning is not None:
            ax.axvline(100 * warning["sparsity"], color="red", ls="--", lw=1.5,
                       label=f"predicted collapse ({100 * warning['sparsity']:.1f}%)" if ax is a1 else None)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7)
    if a2_has:
        a2.legend(fontsize=7)
    a2.set_ylabel("metric")
    a2.set_xlabel("sparsity of each ticket (%)")
    a1.set_title(title or "ticket similarity along the sparsity sweep", fontsize=9)
    return _save(fig, path)


def plot_band_heatmaps(tickets, names, path, *, n_bands: int = 3, title: str = "") -> str:
    """One Jaccard heatmap per depth band (shallow / middle / deep)."""
    plt = _plt()
    bands = jaccard_per_band(tickets, n_bands)
    K = tickets.num_tickets
    fig, axes = plt.subplots(1, len(bands), figsize=(1.0 + (1.2 + 0.4 * K) * len(bands), 1.4 + 0.4 * K))
    axes = np.atleast_1d(axes)
    for ax, (band, j) in zip(axes, bands.items()):
        j = j.numpy()
        im = ax.imshow(j, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(K), names, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(K), names if ax is axes[0] else [""] * K, fontsize=6)
        if K <= 12:
            for a in range(K):
                for b in range(K):
                    ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if j[a, b] < 0.6 else "black")
        ax.set_title(f"{band} layers", fontsize=8)
    fig.colorbar(im, ax=list(axes), fraction=0.03)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_dendrogram(jaccard, names, path, *, title: str = "") -> str:
    """Average-linkage dendrogram of the tickets with distance 1 - Jaccard."""
    plt = _plt()
    try:
        from scipy.cluster.hierarchy import dendrogram, linkage
        from scipy.spatial.distance import squareform
    except ImportError as e:
        raise MissingDependencyError('scipy is required for the dendrogram: pip install "rtl-plugin[plots]"') from e
    d = 1 - np.asarray(jaccard, dtype=float)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.45 * len(names)), 3.4))
    dendrogram(linkage(squareform(np.clip(d, 0, None), checks=False), method="average"), labels=list(names), ax=ax,
               leaf_rotation=60, leaf_font_size=7)
    ax.set_ylabel("1 - Jaccard")
    ax.set_title(title or "ticket dendrogram", fontsize=9)
    return _save(fig, path)


def plot_layer_sparsity(tickets, names, path, *, title: str = "") -> str:
    """Heatmap: kept fraction of each prunable layer (x, forward order) for each ticket (y)."""
    plt = _plt()
    em = tickets.element_masks()
    layers = list(em)
    dens = np.array([[float(em[n][k].float().mean()) for n in layers] for k in range(tickets.num_tickets)])
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * len(layers), 16), 1.2 + 0.3 * tickets.num_tickets))
    from matplotlib.colors import LogNorm
    im = ax.imshow(np.clip(dens, 1e-4, 1), norm=LogNorm(vmin=1e-4, vmax=1), aspect="auto", cmap="magma")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    step = max(1, len(layers) // 40)
    ax.set_xticks(range(0, len(layers), step), [layers[i] for i in range(0, len(layers), step)], rotation=90,
                  fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.03, label="kept (log)")
    ax.set_title(title or "per-layer density per ticket", fontsize=9)
    return _save(fig, path)
