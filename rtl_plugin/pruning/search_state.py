"""Where a ticket search stands (rewind weights, per-ticket progress, recorded masks, history) and its
crash-safe checkpoint on disk."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rtl_plugin.errors import CorruptFileError, TicketError
from rtl_plugin.persist.checkpoint import capture_rng, load_bundle, pack_masks, restore_rng, save_bundle, unpack_masks
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.distributed import on_main_process


@dataclass
class RoundRecord:
    ticket: int
    round: int
    sparsity: float
    loss: float


@dataclass
class SearchResult:
    """Masks at each requested sparsity and the per-round trajectory."""
    tickets_at: dict[float, TicketSet]
    history: list[RoundRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped: dict[int, int] = field(default_factory=dict)  # ticket -> round at which a callback stopped it

    def sparsities(self) -> list[float]:
        return sorted(self.tickets_at)


@dataclass
class TicketProgress:
    """One searched ticket: the index of the next target to record, the rounds done, whether it stopped."""
    target_index: int = 0
    rounds: int = 0
    stopped: bool = False


@dataclass
class SearchState:
    """A search in progress. ``theta``: the rewind weights; ``start``: the masks before the search (restored if
    it fails; unsearched tickets keep them); ``recorded[target][ticket]``: ticket masks recorded at a target."""
    theta: dict[str, torch.Tensor]
    start: TicketSet
    recorded: dict[float, dict[int, dict[str, torch.Tensor]]]
    progress: dict[int, TicketProgress]
    history: list[RoundRecord] = field(default_factory=list)
    stopped: dict[int, int] = field(default_factory=dict)
    rounds_done: int = 0
    sweep: int = 0
    relaxations: int = 0
    started: float = field(default_factory=time.perf_counter)

    def position(self) -> dict:
        return {"states": {str(k): [p.target_index, p.rounds, p.stopped] for k, p in self.progress.items()},
                "rounds_done": self.rounds_done, "sweep": self.sweep, "relaxations": self.relaxations}


def save_search(ck, loaders, state: SearchState, current: TicketSet, targets: list[float]) -> None:
    """``state`` at a round boundary into ``ck = (folder, config)``. The current weights are not stored: every
    round starts by rewinding to θ, and the optimizer is fresh every round."""
    tensors: dict[str, torch.Tensor] = {f"theta/{k}": v for k, v in state.theta.items()}
    pack_masks(state.start.masks, "start", tensors)
    pack_masks(current.masks, "current", tensors)
    rec = []
    for ti, t in enumerate(targets):
        for k, masks in state.recorded[t].items():
            pack_masks(masks, f"recorded/{ti}/{k}", tensors)
            rec.append([ti, k])
    meta = {"position": state.position(), "recorded": rec,
            "stopped": sorted([k, r] for k, r in state.stopped.items()),
            "history": [[h.ticket, h.round, h.sparsity, h.loss] for h in state.history],
            "rng": capture_rng(loaders, tensors)}
    on_main_process(save_bundle, ck[0], "search", tensors, meta, config=ck[1])  # torchrun: rank 0 writes, all wait


def _decode_search(ck, routed, tensors, meta, targets: list[float]) -> tuple[SearchState, TicketSet]:
    K = routed.num_tickets
    shapes = routed.space.mask_shapes()
    theta = {k[len("theta/"):]: v for k, v in tensors.items() if k.startswith("theta/")}
    if set(theta) != set(routed.model.state_dict()):
        raise CorruptFileError(f"the checkpoint's rewind weights do not match this model's state dict keys; "
                               f"delete {ck[0]} to start over.")
    dev = routed.tickets.device
    full = {n: (K, *s) for n, s in shapes.items()}
    start = TicketSet(routed.space, {n: m.to(dev) for n, m in unpack_masks(tensors, "start", full).items()})
    current = TicketSet(routed.space, unpack_masks(tensors, "current", full))
    recorded: dict[float, dict[int, dict[str, torch.Tensor]]] = {t: {} for t in targets}
    for ti, k in meta["recorded"]:
        recorded[targets[ti]][int(k)] = {n: m.to(dev) for n, m in
                                         unpack_masks(tensors, f"recorded/{ti}/{k}", shapes).items()}
    p = meta["position"]
    state = SearchState(
        theta=theta, start=start, recorded=recorded,
        progress={int(k): TicketProgress(int(a), int(b), bool(c)) for k, (a, b, c) in p["states"].items()},
        history=[RoundRecord(ticket=int(a), round=int(b), sparsity=float(c), loss=float(d))
                 for a, b, c, d in meta["history"]],
        stopped={int(k): int(r) for k, r in meta["stopped"]},
        rounds_done=int(p["rounds_done"]), sweep=int(p["sweep"]), relaxations=int(p["relaxations"]))
    return state, current


def load_search(ck, routed, loaders, targets: list[float]) -> SearchState | None:
    """The search state in ``ck``'s folder (None: no checkpoint); loads its rewind weights into the model, sets
    the model's current masks and restores the RNG states."""
    got = load_bundle(ck[0], "search", config=ck[1])
    if got is None:
        return None
    tensors, meta = got
    try:
        state, current = _decode_search(ck, routed, tensors, meta, targets)
    except (KeyError, TypeError, ValueError, IndexError, TicketError) as e:
        raise CorruptFileError(f"the search checkpoint in {ck[0]} is damaged ({e!r}); delete it to start over.") from e
    with torch.no_grad():
        routed.model.load_state_dict(state.theta)
    state.theta = {k: v.detach().clone() for k, v in routed.model.state_dict().items()}  # on the model's device
    routed.set_tickets(current)
    restore_rng(loaders, tensors, meta["rng"])
    return state
