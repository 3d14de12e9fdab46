"""CollapseMonitor: a label-free warning of oncoming subnetwork collapse along a sparsity sweep.

The paper's signal is a sharp change of the mean pairwise ticket similarity (in either direction) and it
gives no threshold. The monitor reads one or more signals of :mod:`rtl_plugin.diagnostics.sweep` per depth band, turns
each into a sequence of changes per unit of log-density (sparsity steps differ from round to round) and
fires on the first point whose change is an outlier with respect to the changes seen so far (a step), while
a flat or slowly drifting signal stays silent. Optionally a bottleneck rule fires when a layer keeps less
than ``min_density`` of its weights.

Use it online as an ``RTLPruner(order="round")`` callback (``action="stop"`` or ``"relax"``: the pruner then
restores every ticket's masks of the previous round) or offline on a recorded :class:`Sweep` with ``scan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rtl_plugin.errors import RTLError
from rtl_plugin.diagnostics.sweep import Sweep, SweepPoint, SweepRecorder

DEFAULT_SIGNALS = ("band_jaccard",)


@dataclass
class CollapseWarning:
    """The monitor's decision: the first sparsity predicted to be collapsed, and why."""
    round: int
    sparsity: float
    confidence: float          # in (0, 1]: how far past the threshold the strongest signal is
    reasons: list[str]

    def to_dict(self) -> dict:
        return {"round": self.round, "sparsity": self.sparsity, "confidence": self.confidence, "reasons": self.reasons}

    def __getitem__(self, key):
        return self.to_dict()[key]


def _series(points: Sequence[SweepPoint], signal: str) -> dict[str, list[float | None]]:
    """``{name: values}`` for a signal; dict-valued signals (per band / per layer) give one series per key."""
    if not points:
        return {}
    first = getattr(points[0], signal, None)
    if first is None and not hasattr(points[0], signal):
        raise RTLError(f"unknown signal {signal!r}; use a SweepPoint field such as 'band_jaccard', 'mean_jaccard', "
                       "'layer_jaccard', 'min_layer_density'.")
    if isinstance(first, dict):
        keys = list(first)
        return {f"{signal}.{k}": [(getattr(p, signal) or {}).get(k) for p in points] for k in keys}
    return {signal: [getattr(p, signal) for p in points]}


class CollapseMonitor:
    """Label-free collapse detector along a sparsity sweep.

    Args:
        signals: SweepPoint fields to watch (dict-valued ones are read per key, e.g. per depth band).
        factor: a change fires when it exceeds ``factor`` x the largest |change| seen before (per series).
        min_change: ... and is at least this large in absolute value (per unit of log-density).
        warmup: points (after the dense start) to observe before the monitor may fire.
        depletion_slope: layer-depletion rule: fire when the sparsest layer's kept fraction falls this many
            times faster than the whole model's, in log-density, over one round (None: off). Global magnitude
            pruning empties some layers first; the tickets break when one of them becomes a bottleneck.
            1.8 fires in time with no false alarm on all 12 measured sweeps (benchmarks/RESULTS.md §4);
            2.0 missed the gradual slide of 2 of the 3 Kaiming-θ0 Fashion sweeps, 1.7 raised a false alarm.
        min_density: bottleneck rule: fire when a layer keeps less than this fraction of its weights
            (None: off).
        action: what the callback asks the pruner to do when it fires: "stop", "relax" or "warn" (record only).
        recorder: the SweepRecorder whose sweep is watched online (default: a fresh one, created here).
    """

    def __init__(self, *, signals: Sequence[str] = DEFAULT_SIGNALS, factor: float = 2.0, min_change: float = 0.05,
                 warmup: int = 2, depletion_slope: float | None = 1.8, min_density: float | None = None,
                 action: str = "stop", recorder: SweepRecorder | None = None):
        if isinstance(signals, str) or not signals:
            raise RTLError("signals must be a non-empty list of SweepPoint field names, e.g. ['band_jaccard'].")
        if not factor > 1:
            raise RTLError(f"factor must be > 1 (a step is a change larger than those before), got {factor}.")
        if not min_change >= 0:
            raise RTLError(f"min_change must be >= 0, got {min_change}.")
        if not isinstance(warmup, int) or warmup < 1:
            raise RTLError(f"warmup must be an int >= 1, got {warmup!r}.")
        if depletion_slope is not None and not depletion_slope > 1:
            raise RTLError(f"depletion_slope must be > 1 (1 = the layer thins out as fast as the model) or None, "
                           f"got {depletion_slope}.")
        if min_density is not None and not 0 < min_density < 1:
            raise RTLError(f"min_density must be in (0, 1) or None, got {min_density}.")
        if action not in ("stop", "relax", "warn"):
            raise RTLError(f"action must be 'stop', 'relax' or 'warn', got {action!r}.")
        self.signals, self.factor, self.min_change = list(signals), float(factor), float(min_change)
        self.warmup, self.min_density, self.action = warmup, min_density, action
        self.depletion_slope = depletion_slope
        self.recorder = recorder
        self.warnings: list[CollapseWarning] = []

    # -------------------------------------------------------------- offline
    def check(self, points: Sequence[SweepPoint]) -> CollapseWarning | None:
        """Decide on the LAST point of ``points`` (earlier points are history)."""
        i = len(points) - 1
        if i < self.warmup + 1:
            return None
        reasons, strength = [], 0.0
        x = [-math.log(max(1 - p.sparsity, 1e-12)) for p in points]   # log-density axis
        for sig in self.signals:
            for name, vals in _series(points, sig).items():
                if vals[i] is None or vals[i - 1] is None:
                    continue
                d = [(vals[j] - vals[j - 1]) / max(x[j] - x[j - 1], 1e-9) for j in range(1, i + 1)
                     if vals[j] is not None and vals[j - 1] is not None]
                if len(d) < self.warmup + 1:
                    continue
                prev = max(abs(v) for v in d[:-1])
                ref = max(self.factor * prev, self.min_change)
                if abs(d[-1]) > ref:
                    reasons.append(f"{name} changed {vals[i - 1]:.3f} -> {vals[i]:.3f} "
                                   f"({d[-1]:+.3f} per log-density unit; largest before {prev:.3f})")
                    strength = max(strength, abs(d[-1]) / ref)
        if self.depletion_slope is not None and i >= 2:
            # the most depleted layer empties faster than the model: d ln(min layer density) / d ln(model density)
            a, b = points[i - 1].min_layer_density, points[i].min_layer_density
            dx = x[i] - x[i - 1]
            if a > 0 and dx > 0:
                slope = (math.log(a) - math.log(b)) / dx if b > 0 else math.inf
                if slope > self.depletion_slope:
                    worst = min(points[i].layer_density, key=points[i].layer_density.get)
                    reasons.append(f"layer depletion: the sparsest layer ({worst}) went {a:.4f} -> {b:.4f} kept, "
                                   f"{slope:.2f}x faster than the whole model in log-density "
                                   f"(threshold {self.depletion_slope})")
                    strength = max(strength, min(slope / self.depletion_slope, 1e3))
        if self.min_density is not None and points[i].min_layer_density < self.min_density:
            worst = min(points[i].layer_density, key=points[i].layer_density.get)
            reasons.append(f"layer {worst} keeps {points[i].layer_density[worst]:.4f} of its weights "
                           f"(< {self.min_density})")
            strength = max(strength, self.min_density / max(points[i].min_layer_density, 1e-9))
        if not reasons:
            return None
        conf = 1 - 1 / (1 + strength)  # 0.5 at the threshold, -> 1 far past it
        return CollapseWarning(round=points[i].round, sparsity=points[i].sparsity, confidence=round(conf, 4),
                               reasons=reasons)

    def scan(self, sweep: Sweep | Sequence[SweepPoint]) -> CollapseWarning | None:
        """The first point at which the monitor fires when fed the sweep point by point (None: never)."""
        points = sweep.points if isinstance(sweep, Sweep) else list(sweep)
        for i in range(1, len(points) + 1):
            w = self.check(points[:i])
            if w is not None:
                return w
        return None

    # -------------------------------------------------------------- online (RTLPruner callback)
    def _rec(self) -> SweepRecorder:
        if self.recorder is None:
            self.recorder = SweepRecorder()
        return self.recorder

    def on_trained(self, event: dict) -> None:
        self._rec().on_trained(event)

    def __call__(self, event: dict) -> None:
        return self._rec()(event)

    def on_round_end(self, event: dict) -> str | None:
        rec = self._rec()
        rec.on_round_end(event)
        w = self.check(rec.sweep.points)
        if w is None:
            return None
        self.warnings.append(w)
        rec.sweep.events.append({**w.to_dict(), "action": self.action,
                                 "restored_sparsity": rec.sweep.points[-2].sparsity})
        if self.action != "warn":
            rec.undo_last()  # the pruner restores the previous round's masks
        return None if self.action == "warn" else self.action

    @property
    def sweep(self) -> Sweep:
        return self._rec().sweep
