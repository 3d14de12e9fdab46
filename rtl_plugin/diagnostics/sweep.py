"""A sparsity sweep: label-free signals (and, when labels are available, a task metric) at every pruning round.

Use it as a callback of ``RTLPruner(order="round")``: after every round of all tickets it records

* mask signals of the new masks M_r: mean pairwise Jaccard globally, per depth band and per layer, the chance
  level, per-layer and per-band remaining density, mask churn ``1 - J(M_r, M_{r-1})`` per ticket (for nested
  IMP masks this is just the pruned fraction) and allocation churn (how much of the surviving budget moved
  between layers: half the L1 distance of the per-layer shares of surviving weights);
* output signals on ``probe`` inputs (no labels): agreement of each ticket's predictions before and after
  the round's pruning (trained weights, masks M_{r-1} vs M_r: the damage one round does), agreement of the
  trained ticket's predictions between consecutive rounds, and the mean pairwise cosine similarity of the
  tickets' outputs on the same inputs;
* ``metric(model, k)`` of every trained ticket when given (labels).

Output and metric signals of the masks M_{r-1} exist only once ticket k was trained with them, i.e. during
round r; so ``point[i]`` (masks after i rounds) gets them one round later, and the last point has none.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rtl_plugin.diagnostics.similarity import chance_jaccard, depth_bands
from rtl_plugin.errors import RTLError, TicketError
from rtl_plugin.persist.io import atomic_write_json
from rtl_plugin.tickets import TicketSet, jaccard_from_counts, pair_counts

MASK_SIGNALS = ("mean_jaccard", "min_layer_density", "allocation_churn", "mask_churn")
OUTPUT_SIGNALS = ("prune_agreement", "round_agreement", "output_similarity")


def default_predict(outputs: torch.Tensor, k: int) -> torch.Tensor:
    """Class predictions [N] from outputs [N, C, ...] (argmax over dim 1) or [N] / [N, 1] (sign)."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return (outputs.reshape(-1) > 0).long()
    return outputs.argmax(1)


@dataclass
class SweepPoint:
    """The state after ``round`` pruning rounds of every ticket (sparsity in [0, 1], Jaccard in [0, 1])."""
    round: int
    sparsity: float                      # mean over the searched tickets
    ticket_sparsity: list[float]
    mean_jaccard: float
    chance: float
    band_jaccard: dict[str, float]
    band_density: dict[str, float]       # kept fraction of the band's weights, mean over tickets
    layer_jaccard: dict[str, float]
    layer_density: dict[str, float]
    min_layer_density: float
    mask_churn: float | None = None      # mean over tickets of 1 - J(M_r, M_{r-1})
    allocation_churn: float | None = None
    prune_agreement: float | None = None     # trained ticket, masks of this point vs the previous point
    round_agreement: float | None = None     # trained ticket at this point vs at the previous point
    output_similarity: float | None = None   # mean pairwise cosine of the trained tickets' outputs
    pruned_output_similarity: float | None = None  # the same for the trained weights under THIS point's masks
    metric: list[float] | None = None        # per ticket, trained at this point's masks
    mean_metric: float | None = None


@dataclass
class Sweep:
    """All points of one sweep plus the ticket names and the depth bands' layers."""
    points: list[SweepPoint] = field(default_factory=list)
    bands: dict[str, list[str]] = field(default_factory=dict)
    tickets: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # monitor decisions (filled by CollapseMonitor)

    def series(self, name: str) -> list[float | None]:
        """One signal along the sweep (None where it was not measured)."""
        if self.points and not hasattr(self.points[0], name):
            raise RTLError(f"unknown sweep signal {name!r}; choose one of {sorted(vars(self.points[0]))}.")
        return [getattr(p, name) for p in self.points]

    def to_dict(self) -> dict:
        return {"format": "rtl-sweep", "format_version": 1, "tickets": self.tickets, "bands": self.bands,
                "points": [asdict(p) for p in self.points], "events": self.events}

    @classmethod
    def from_dict(cls, d: dict) -> "Sweep":
        if not isinstance(d, dict) or d.get("format") != "rtl-sweep":
            raise RTLError("not an rtl sweep (expected a dict with format 'rtl-sweep', as written by Sweep.save).")
        if int(d.get("format_version", 0)) > 1:
            raise RTLError(f"sweep format_version {d.get('format_version')} is newer than this rtl-plugin reads (1); "
                           "upgrade rtl-plugin.")
        return cls(points=[SweepPoint(**p) for p in d["points"]], bands=d.get("bands", {}),
                   tickets=list(d.get("tickets", [])), events=list(d.get("events", [])))

    def save(self, path) -> str:
        atomic_write_json(path, self.to_dict())
        return str(path)

    @classmethod
    def load(cls, path) -> "Sweep":
        p = Path(path)
        if not p.is_file():
            raise RTLError(f"no sweep file at {p}; run the search with a SweepRecorder and save its sweep.")
        return cls.from_dict(json.loads(p.read_text()))


def _mask_state(tickets: TicketSet, which: list[int]) -> dict[str, torch.Tensor]:
    """Element masks of the searched tickets, ``{layer: bool [len(which), *shape]}`` (copies)."""
    idx = torch.tensor(which, dtype=torch.long)
    return {n: m.index_select(0, idx.to(m.device)).cpu().clone() for n, m in tickets.element_masks().items()}


class SweepRecorder:
    """RTLPruner callback recording a :class:`Sweep` (use ``order="round"``).

    Args:
        probe: unlabeled inputs, a tensor [N, ...] on the model's device (or a tuple passed as ``model(*probe)``);
            enables the output signals. A few hundred inputs are enough.
        predict: ``(outputs, k) -> predictions [N]`` (default: argmax over dim 1, sign for one output).
            For one-vs-rest detector tickets use e.g. ``lambda out, k: (out[:, k] > 0).long()``.
        metric: ``(model, k) -> float`` evaluated on ticket k right after its training (labels; optional).
            ``model`` is the RoutedModel; use ``model.ticket_module(k)`` or ``model(x, route=k)``.
        n_bands: number of depth bands (3: shallow / middle / deep).
    """

    def __init__(self, *, probe=None, predict: Callable | None = None, metric: Callable | None = None,
                 n_bands: int = 3):
        if probe is not None and not isinstance(probe, (torch.Tensor, tuple)):
            raise RTLError(f"probe must be a tensor batch [N, ...] or a tuple of tensors, got {type(probe).__name__}.")
        if predict is not None and not callable(predict):
            raise RTLError("predict must be a callable (outputs, k) -> predictions [N].")
        if metric is not None and not callable(metric):
            raise RTLError("metric must be a callable (model, k) -> float.")
        if not isinstance(n_bands, int) or n_bands < 1:
            raise TicketError(f"n_bands must be an int >= 1, got {n_bands!r}.")
        self.probe, self.predict, self.metric, self.n_bands = probe, predict or default_predict, metric, n_bands
        self.sweep = Sweep()
        self._prev_masks: dict[str, torch.Tensor] | None = None
        self._trained_out: dict[int, torch.Tensor] = {}     # ticket -> outputs of the trained ticket (this round)
        self._pruned_out: dict[int, torch.Tensor] = {}      # ticket -> outputs after this round's pruning
        self._last_trained_pred: dict[int, torch.Tensor] = {}
        self._metric: dict[int, float] = {}
        self._pending_prune_agreement: float | None = None
        self._pending_pruned_similarity: float | None = None
        self._undo_masks: dict[str, torch.Tensor] | None = None

    # -------------------------------------------------------------- pruner hooks
    def _outputs(self, model, k: int) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                args = self.probe if isinstance(self.probe, tuple) else (self.probe,)
                out = model(*args, route=k)
        finally:
            model.train(was)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().cpu()

    def on_trained(self, event: dict) -> None:
        k, model = event["ticket"], event["model"]
        if self.probe is not None:
            self._trained_out[k] = self._outputs(model, k)
        if self.metric is not None:
            self._metric[k] = float(self.metric(model, k))

    def __call__(self, event: dict) -> None:
        if self.probe is not None:
            self._pruned_out[event["ticket"]] = self._outputs(event["model"], event["ticket"])
        return None

    def on_round_end(self, event: dict) -> None:
        tickets: TicketSet = event["tickets"]
        which = list(event["searched"])
        if not self.sweep.points:  # point 0: the dense start
            self.sweep.tickets = which
            self.sweep.bands = depth_bands(list(tickets.space.layers), self.n_bands)
            self._prev_masks = {n: torch.ones_like(m) for n, m in _mask_state(tickets, which).items()}
            self.sweep.points.append(self._mask_point(0, self._prev_masks, None))
        masks = _mask_state(tickets, which)
        self._attach_trained(self.sweep.points[-1], which)
        point = self._mask_point(int(event["round"]), masks, self._prev_masks)
        self.sweep.points.append(point)
        self._undo_masks, self._prev_masks = self._prev_masks, masks
        return None

    def undo_last(self) -> SweepPoint:
        """Forget the last point (the pruner restored the previous round's masks); returns it."""
        if len(self.sweep.points) < 2 or self._undo_masks is None:
            raise RTLError("nothing to undo: the sweep has no round after the dense start.")
        self._prev_masks, self._undo_masks = self._undo_masks, None
        return self.sweep.points.pop()

    # -------------------------------------------------------------- signals
    def _attach_trained(self, prev: SweepPoint, which: list[int]) -> None:
        """Output and metric signals of the masks ticket k was trained with this round (the previous point)."""
        if self.metric is not None and all(k in self._metric for k in which):
            prev.metric = [self._metric[k] for k in which]
            prev.mean_metric = float(sum(prev.metric) / len(prev.metric))
        if self.probe is None or not all(k in self._trained_out for k in which):
            return
        pa, ra = [], []
        for k in which:
            p_trained = self.predict(self._trained_out[k], k)
            if k in self._pruned_out:
                pa.append(float((self.predict(self._pruned_out[k], k) == p_trained).float().mean()))
            if k in self._last_trained_pred:
                ra.append(float((self._last_trained_pred[k] == p_trained).float().mean()))
            self._last_trained_pred[k] = p_trained
        # prune agreement belongs to the NEW point (its masks did the damage); stored on the new point by the caller
        self._pending_prune_agreement = sum(pa) / len(pa) if pa else None
        prev.round_agreement = sum(ra) / len(ra) if ra else None
        prev.output_similarity = _output_similarity([self._trained_out[k] for k in which])
        if all(k in self._pruned_out for k in which):
            self._pending_pruned_similarity = _output_similarity([self._pruned_out[k] for k in which])
        self._trained_out.clear()
        self._pruned_out.clear()
        self._metric.clear()

    def _mask_point(self, rnd: int, masks: dict[str, torch.Tensor], prev: dict[str, torch.Tensor] | None) -> SweepPoint:
        K = next(iter(masks.values())).shape[0]
        layers = list(masks)
        sizes = {n: masks[n][0].numel() for n in layers}
        total = sum(sizes.values())
        kept = {n: masks[n].reshape(K, -1).sum(1).double() for n in layers}        # [K] per layer
        kept_all = sum(kept.values())                                               # [K]
        sp = (1 - kept_all / total).tolist()
        j = jaccard_from_counts(*pair_counts([masks[n] for n in layers], K))
        mean_j = _offdiag(j)
        keep = [1 - s for s in sp]
        chance = sum(chance_jaccard(keep[a], keep[b]) for a in range(K) for b in range(K) if a != b) / max(K * (K - 1), 1)
        layer_j = {n: _offdiag(jaccard_from_counts(*pair_counts([masks[n]], K))) for n in layers}
        layer_d = {n: float(kept[n].mean() / sizes[n]) for n in layers}
        band_j, band_d = {}, {}
        for b, ls in self.sweep.bands.items():
            if ls:
                band_j[b] = _offdiag(jaccard_from_counts(*pair_counts([masks[n] for n in ls], K)))
                band_d[b] = float(sum(kept[n] for n in ls).mean() / sum(sizes[n] for n in ls))
        point = SweepPoint(round=rnd, sparsity=float(sum(sp) / K), ticket_sparsity=[float(s) for s in sp],
                           mean_jaccard=mean_j, chance=float(chance), band_jaccard=band_j, band_density=band_d,
                           layer_jaccard=layer_j, layer_density=layer_d, min_layer_density=min(layer_d.values()))
        if prev is not None:
            churn, alloc = [], []
            for k in range(K):
                inter = sum(int((masks[n][k] & prev[n][k]).sum()) for n in layers)
                union = sum(int((masks[n][k] | prev[n][k]).sum()) for n in layers)
                churn.append(1 - inter / union if union else 0.0)
                a = torch.tensor([float(kept[n][k]) for n in layers])
                b = torch.tensor([float(prev[n][k].sum()) for n in layers])
                alloc.append(0.5 * float((a / a.sum().clamp_min(1) - b / b.sum().clamp_min(1)).abs().sum()))
            point.mask_churn = sum(churn) / K
            point.allocation_churn = sum(alloc) / K
            point.prune_agreement = self._pending_prune_agreement
            point.pruned_output_similarity = self._pending_pruned_similarity
            self._pending_prune_agreement = self._pending_pruned_similarity = None
        return point


def _output_similarity(outputs: list[torch.Tensor]) -> float:
    """Mean pairwise cosine similarity of the tickets' (centred, flattened) outputs on the same inputs."""
    K = len(outputs)
    if K < 2:
        return 1.0
    outs = torch.stack([o.reshape(-1) for o in outputs])
    outs = torch.nn.functional.normalize(outs - outs.mean(1, keepdim=True), dim=1)
    cos = outs @ outs.T
    return float((cos.sum() - cos.diagonal().sum()) / (K * (K - 1)))


def _offdiag(j: torch.Tensor) -> float:
    K = j.shape[0]
    return 1.0 if K < 2 else float((j.sum() - j.diagonal().sum()) / (K * (K - 1)))


def is_finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
