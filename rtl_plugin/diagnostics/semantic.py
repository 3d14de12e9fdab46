"""Semantic alignment: does ticket similarity follow class similarity?

``semantic_alignment`` correlates (Spearman, over the K(K-1)/2 ticket pairs) the tickets' mask Jaccard,
globally and per depth band, with any user-given class similarity matrix. ``wordnet_similarity`` builds
such a matrix offline from the WordNet 3.0 noun database of the Debian package ``wordnet-base``
(path similarity 1 / (1 + shortest hypernym-path length), as in NLTK), the paper's choice for CIFAR-10.
"""
from __future__ import annotations

import os
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from rtl_plugin.diagnostics.similarity import jaccard_per_band
from rtl_plugin.errors import MissingDependencyError, RTLError, TicketError
from rtl_plugin.tickets import TicketSet

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet-3.0/dict")
INSTALL_HINT = "install the offline WordNet database: `apt-get install wordnet-base` (or pass data_dir=/path/to/dict)"


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), float64 [n]."""
    v = v.double()
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for u in torch.unique(v):  # average tied ranks
        idx = v == u
        if int(idx.sum()) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(a, b) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (t approximation; nan when n < 3 or constant)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).reshape(-1), torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise RTLError(f"spearman needs two sequences of equal length, got {tuple(a.shape)} and {tuple(b.shape)}.")
    n = a.numel()
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    if n < 3 or den == 0:
        return float("nan"), float("nan")
    rho = max(-1.0, min(1.0, float((ra * rb).sum()) / den))
    try:
        from scipy.stats import t as student_t
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return rho, float("nan")
    if abs(rho) >= 1:
        return rho, 0.0
    tstat = rho * ((n - 2) / (1 - rho * rho)) ** 0.5
    return rho, float(2 * student_t.sf(abs(tstat), n - 2))


def _upper(m: torch.Tensor) -> torch.Tensor:
    K = m.shape[0]
    i, j = torch.triu_indices(K, K, offset=1)
    return m[i, j]


def semantic_alignment(tickets: TicketSet, class_similarity, *, n_bands: int = 3) -> dict[str, dict[str, float]]:
    """Spearman correlation between ticket-pair Jaccard and class-pair similarity.

    Args:
        tickets: K tickets, ticket k = class k.
        class_similarity: [K, K] symmetric matrix (any scale: only the ranks of its upper triangle matter).
    Returns:
        ``{"global" | band: {"rho", "p_value", "pairs"}}``.
    """
    if not isinstance(tickets, TicketSet):
        raise TicketError(f"semantic_alignment needs a TicketSet, got {type(tickets).__name__}.")
    S = torch.as_tensor(class_similarity, dtype=torch.float64)
    K = tickets.num_tickets
    if S.shape != (K, K):
        raise RTLError(f"class_similarity must be a [{K}, {K}] matrix (one row per ticket/class), got {tuple(S.shape)}.")
    if not torch.isfinite(S).all():
        raise RTLError("class_similarity contains NaN or inf.")
    if not torch.allclose(S, S.T):
        raise RTLError("class_similarity must be symmetric (similarity of a to b = of b to a).")
    if K < 3:
        raise TicketError(f"semantic alignment needs at least 3 tickets (3 pairs), got K={K}.")
    target = _upper(S)
    out = {}
    mats = {"global": tickets.jaccard(), **jaccard_per_band(tickets, n_bands)}
    for name, j in mats.items():
        rho, p = spearman(_upper(j.double()), target)
        out[name] = {"rho": rho, "p_value": p, "pairs": int(target.numel())}
    return out


# ------------------------------------------------------------------------------------------ WordNet
def find_wordnet(data_dir=None) -> Path:
    """The folder holding WordNet's ``index.noun`` / ``data.noun`` (raises with the install line if absent)."""
    cands = [data_dir] if data_dir is not None else [os.environ.get("WNHOME") and Path(os.environ["WNHOME"]) / "dict",
                                                      *WORDNET_DIRS]
    for c in cands:
        if c and (Path(c) / "index.noun").is_file() and (Path(c) / "data.noun").is_file():
            return Path(c)
    where = data_dir if data_dir is not None else ", ".join(WORDNET_DIRS)
    raise MissingDependencyError(f"WordNet noun database not found in {where}; {INSTALL_HINT}.")


@lru_cache(maxsize=4)
def _noun_db(folder: str) -> tuple[dict[str, list[int]], dict[int, list[int]]]:
    """``(lemma -> synset offsets in sense order, offset -> hypernym offsets)`` from the WordNet files."""
    index: dict[str, list[int]] = {}
    with open(Path(folder) / "index.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split()
            n_syn, n_ptr = int(parts[2]), int(parts[3])
            index[parts[0]] = [int(o) for o in parts[6 + n_ptr:6 + n_ptr + n_syn]]
    hyper: dict[int, list[int]] = {}
    with open(Path(folder) / "data.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split(" | ")[0].split()
            off, w_cnt = int(parts[0]), int(parts[3], 16)
            i = 4 + 2 * w_cnt
            p_cnt = int(parts[i])
            ups = []
            for q in range(p_cnt):
                sym, target, pos = parts[i + 1 + 4 * q: i + 4 + 4 * q]
                if sym in ("@", "@i") and pos == "n":
                    ups.append(int(target))
            hyper[off] = ups
    return index, hyper


def _ancestors(off: int, hyper: dict[int, list[int]]) -> dict[int, int]:
    """Every hypernym ancestor (and itself) with its shortest distance."""
    dist = {off: 0}
    q = deque([off])
    while q:
        s = q.popleft()
        for h in hyper.get(s, ()):
            if h not in dist:
                dist[h] = dist[s] + 1
                q.append(h)
    return dist


def _synset(name: str, index) -> int:
    word, _, sense = name.strip().lower().replace(" ", "_").replace("-", "_").partition("#")
    if word not in index:
        raise RTLError(f"{name!r} is not a WordNet noun; pass the closest noun (e.g. 'tee_shirt' for 'T-shirt/top', "
                       f"'boot' for 'Ankle boot'), optionally with a sense number like 'boot#1'.")
    senses = index[word]
    s = int(sense) if sense else 1
    if not 1 <= s <= len(senses):
        raise RTLError(f"{name!r}: WordNet has senses 1..{len(senses)} for {word!r}.")
    return senses[s - 1]


def wordnet_similarity(names: Sequence[str], *, data_dir=None) -> torch.Tensor:
    """[C, C] WordNet path similarity between class names (nouns; ``'word#n'`` picks sense n, default 1)."""
    if isinstance(names, str) or len(names) < 2:
        raise RTLError("names must be a list of at least 2 class names (WordNet nouns).")
    index, hyper = _noun_db(str(find_wordnet(data_dir)))
    offs = [_synset(n, index) for n in names]
    anc = [_ancestors(o, hyper) for o in offs]
    C = len(names)
    S = torch.eye(C, dtype=torch.float64)
    for a in range(C):
        for b in range(a + 1, C):
            common = set(anc[a]) & set(anc[b])
            d = min((anc[a][c] + anc[b][c] for c in common), default=None)
            S[a, b] = S[b, a] = 0.0 if d is None else 1.0 / (1 + d)
    return S


FASHION_MNIST_NOUNS = ("tee_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "boot")
