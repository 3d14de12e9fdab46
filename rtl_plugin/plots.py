"""Figures (matplotlib, imported lazily; headless 'Agg' backend)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from .errors import MissingDependencyError
        raise MissingDependencyError('matplotlib is required for figures: pip install "rtl-plugin[plots]"') from e
    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_jaccard(jaccard, names, path, title: str = "") -> str:
    """Heatmap of pairwise ticket Jaccard similarity."""
    plt = _plt()
    import numpy as np
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


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
