"""Semantic alignment of Fashion-MNIST class tickets with WordNet (the paper's CIFAR-10 analysis, offline).

For each seed: the RTL ticket search of ``fashion_detectors.py`` (10 one-vs-rest class tickets, same data,
model, θ0 and schedule), then at every target sparsity the Spearman correlation between the tickets' pairwise
mask Jaccard (globally and per depth band) and the WordNet path similarity of the class names (Debian
``wordnet-base``: tee_shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot).

Usage::

    python benchmarks/semantic_alignment.py --seeds 0,1,2 --out benchmarks/results/semantic_alignment.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rtl_plugin as rtl  # noqa: E402
from fashion_detectors import K, load_data, log, machine_info, model_factory  # noqa: E402
from rtl_plugin.tasks.classification.detectors import detector_train_step, one_vs_rest_loaders  # noqa: E402
from rtl_plugin.persist.io import atomic_write_json  # noqa: E402
from rtl_plugin.diagnostics.semantic import FASHION_MNIST_NOUNS, semantic_alignment, wordnet_similarity  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sparsities", default="0.5,0.75,0.9")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=30)
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="benchmarks/results/semantic_alignment.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    S = wordnet_similarity(FASHION_MNIST_NOUNS)
    sps = [float(s) for s in a.sparsities.split(",")]
    res = {"benchmark": "semantic_alignment", "nouns": list(FASHION_MNIST_NOUNS), "wordnet_similarity": S.tolist(),
           "settings": vars(a), "machine": machine_info(), "per_seed": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        xtr, ytr, _, _ = load_data(a.train_per_class, 1, seed)
        routed = rtl.wrap(model_factory("cnn")(seed), K, example_inputs=xtr[:1])
        loaders = one_vs_rest_loaders(xtr, ytr, num_classes=K, batch_size=a.batch_size, seed=seed)
        search = rtl.RTLPruner(routed, sparsities=sps, prune_fraction=a.prune_fraction, progress=False).find_tickets(
            loaders, train_step=detector_train_step(), optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr))
        per = {}
        for s in sps:
            per[str(s)] = semantic_alignment(search.tickets_at[s], S)
        res["per_seed"].append({"seed": seed, "alignment": per})
        log(f"seed {seed}: done in {time.perf_counter() - t0:.0f}s: " +
            ", ".join(f"{s}: " + " ".join(f"{b}={v['rho']:+.2f}" for b, v in per[str(s)].items()) for s in per))
        atomic_write_json(a.out, res)
    lines = ["| sparsity | " + " | ".join(res["per_seed"][0]["alignment"][str(sps[0])]) + " |",
             "|---|" + "---|" * len(res["per_seed"][0]["alignment"][str(sps[0])])]
    for s in sps:
        cells = []
        for b in res["per_seed"][0]["alignment"][str(s)]:
            rhos = [r["alignment"][str(s)][b]["rho"] for r in res["per_seed"]]
            ps = [r["alignment"][str(s)][b]["p_value"] for r in res["per_seed"]]
            cells.append(f"{np.mean(rhos):+.2f} ± {np.std(rhos):.2f} (p {min(ps):.3f}–{max(ps):.3f})")
        lines.append(f"| {100 * s:g}% | " + " | ".join(cells) + " |")
    res["markdown"] = "\n".join(lines)
    atomic_write_json(a.out, res)
    print(res["markdown"])
    return res


if __name__ == "__main__":
    main()
