"""RTL's tickets learned instead of found by IMP, inside the comparison protocol (``ComparisonConfig.tickets=
"learned"``, ``rtl prune --tickets learned``).

Per target sparsity the routed model is rewound to θ0 and :func:`~rtl_plugin.training.learned.learn_tickets`
learns the K tickets' masks with a jointly trained :class:`~rtl_plugin.routing.gate.Gate`, on the task's subsets
mixed into balanced batches ``(x, y, subset)`` (the samples and number of steps of RTL's joint retraining per
epoch). ``routing="groups"``: each subset trains its ticket and the gate learns the subsets; ``"gate"``
(label-free): the gate routes every sample and the subset ids are only reported. The learned tickets are
evaluated as trained, without IMP's joint retraining (a frozen backbone stays bit-identical; a co-trained one
was trained by ``learn_tickets``). The baselines reuse the learned masks where they reuse RTL's (multi-model
retraining, equal-storage unions).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from rtl_plugin.comparison.baselines import BalancedLoader
from rtl_plugin.errors import CorruptFileError, DataError, RouteError
from rtl_plugin.persist.io import atomic_write_json
from rtl_plugin.routing.gate import Gate
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.learned import BACKBONES, ROUTINGS, learn_tickets

__all__ = ["TICKET_SOURCES", "LearnedOptions", "LearnedSearch", "search_learned", "restore_learned", "save_gate",
           "load_gate", "GATE_WEIGHTS", "GATE_CONFIG"]

TICKET_SOURCES = ("imp", "learned")
GATE_WEIGHTS, GATE_CONFIG = "gate.safetensors", "gate.json"  # beside the tickets of one sparsity


@dataclass
class LearnedOptions:
    """``learn_tickets`` settings of the protocol's learned tickets (``epochs``: passes over the balanced
    batches; ``lr``: the scores' and gate's Adam rate, the backbone's is the protocol's ``lr``)."""
    routing: str = "gate"
    backbone: str = "frozen"
    epochs: int = 1
    lr: float = 1e-2
    seed: int = 0

    def validate(self) -> "LearnedOptions":
        if self.routing not in ROUTINGS:
            raise DataError(f"learned routing must be one of {ROUTINGS} ('groups': the task's subsets train the "
                            f"tickets; 'gate': label-free), got {self.routing!r}.")
        if self.backbone not in BACKBONES:
            raise DataError(f"learned backbone must be one of {BACKBONES}, got {self.backbone!r}.")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise DataError(f"learned epochs must be an int >= 1, got {self.epochs!r}.")
        return self


@dataclass
class LearnedSearch:
    """Per target sparsity: the tickets, the model state they were trained with (co-trained weights, per-ticket
    norm statistics), the jointly trained gate and ``LearnedTickets.to_dict()``."""
    tickets_at: dict[float, TicketSet] = field(default_factory=dict)
    states: dict[float, dict] = field(default_factory=dict)
    gates: dict[float, Gate] = field(default_factory=dict)
    results: dict[float, dict] = field(default_factory=dict)
    history: list = field(default_factory=list)  # no IMP rounds

    def summary(self) -> list[dict]:
        return [{"sparsity": s, **{k: r[k] for k in ("gate_accuracy", "route_counts", "steps", "wall_time_s")}}
                for s, r in self.results.items()]


def search_learned(routed, theta0: dict, loaders: dict, sparsities, options: LearnedOptions, *, lr: float,
                   trainable=(), device=None) -> LearnedSearch:
    """Learn the tickets at every sparsity, each from θ0 (see the module docstring)."""
    options.validate()
    seed = options.seed
    search = LearnedSearch()
    data = BalancedLoader(loaders, with_context=True, seed=seed)
    for s in sorted(sparsities):
        routed.model.load_state_dict(theta0)
        gate = Gate(routed.num_tickets, seed=seed)
        res = learn_tickets(routed, data, sparsity=s, epochs=options.epochs, routing=options.routing, gate=gate,
                            backbone=options.backbone, trainable=list(trainable), lr=options.lr, gate_lr=options.lr,
                            backbone_lr=lr, seed=seed, device=device)
        search.tickets_at[s] = TicketSet(routed.space, {n: m.clone() for n, m in res.tickets.masks.items()})
        search.states[s] = copy.deepcopy(routed.model.state_dict())
        search.gates[s] = gate.eval()
        search.results[s] = res.to_dict()
    return search


def restore_learned(routed, search: LearnedSearch, sparsity: float) -> None:
    """Put the model state and tickets learned at ``sparsity`` back on ``routed``."""
    routed.model.load_state_dict(search.states[sparsity])
    routed.set_tickets(search.tickets_at[sparsity])


def save_gate(gate: Gate, folder) -> Path:
    """Write the jointly trained gate into a saved tickets folder (``gate.safetensors`` + ``gate.json``)."""
    from safetensors.torch import save_file
    if not isinstance(gate, Gate) or not gate.built:
        raise RouteError("save_gate needs a trained rtl_plugin.routing.Gate (learn_tickets builds its layers).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}, str(folder / GATE_WEIGHTS))
    atomic_write_json(folder / GATE_CONFIG, {"num_tickets": gate.num_tickets, "pool": gate.pool, "bins": gate.bins,
                                             "input_shape": list(gate.input_shape), "seed": gate.seed})
    return folder


def load_gate(folder) -> Gate:
    """The gate :func:`save_gate` wrote into ``folder`` (eval mode)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / GATE_CONFIG).is_file() or not (folder / GATE_WEIGHTS).is_file():
        raise RouteError(f"{folder} holds no jointly trained gate ({GATE_CONFIG}, {GATE_WEIGHTS}); only runs with "
                         "`rtl prune --tickets learned` save one. Use another --router.")
    try:
        cfg = json.loads((folder / GATE_CONFIG).read_text())
        gate = Gate(int(cfg["num_tickets"]), pool=int(cfg["pool"]), bins=int(cfg["bins"]),
                    input_shape=tuple(cfg["input_shape"]), seed=int(cfg["seed"]))
        gate.load_state_dict(load_file(str(folder / GATE_WEIGHTS)), strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CorruptFileError(f"{folder}'s gate files are unreadable or inconsistent ({e}); rerun `rtl prune "
                               "--tickets learned` to write them again.") from e
    return gate.eval()
