"""Add a ticket later without forgetting (PackNet / WSN style): ticket K joins K trained tickets.

``grow_ticket(routed, loader, ...)`` calls ``routed.add_ticket`` (K -> K + 1, own norm statistics), searches the
newcomer with the pruner's public steps (``begin_search(tickets=[K])``, ``rewind``, ``train_ticket``,
``prune_round``, ``finish_search``) on the new data, then retrains it. Every optimizer step runs inside a
:class:`~rtl_plugin.training.masked.MaskedUpdate` whose ``owned=`` entries are the *free* ones: entries the
newcomer keeps that no earlier ticket owns. Everything an earlier ticket owns (its kept weights, in channel mode
the biases and norm affine entries of its channels) and every parameter outside the ticket space (output layers,
weight-mode biases and norm affines) is read-only, and the rewinds load weights those steps never changed, so
the earlier tickets compute bit for bit what they computed before. The newcomer reuses the read-only entries it
keeps (:class:`GrowthReport`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from rtl_plugin.errors import DataError, SparsityError, TicketError
from rtl_plugin.pruning.gradients import estimate_gradients, needs_gradients
from rtl_plugin.pruning.pruner import RTLPruner, SearchResult
from rtl_plugin.norms import RoutedBatchNorm
from rtl_plugin.routed import RoutedModel
from rtl_plugin.training.loop import TrainStep, default_train_step, normalize_subsets
from rtl_plugin.training.masked import MaskedUpdate, ticket_param_masks
from rtl_plugin.training.optim import fresh_optimizers

__all__ = ["GrowthReport", "GrownTicket", "free_entries", "growth_report", "newcomer_train_step", "apply_reuse_budget",
           "grow_ticket"]


@dataclass(frozen=True)
class GrowthReport:
    """What ticket ``ticket`` reuses and adds, in prunable weight elements.

    ``kept``: weights it keeps; ``reused``: kept weights an earlier ticket owns (read-only for it); ``added``:
    kept weights no earlier ticket owns (the ones it trained); ``free_before``: prunable weights no earlier
    ticket owned; ``sparsity``: its own sparsity."""
    ticket: int
    earlier: tuple[int, ...]
    kept: int
    reused: int
    added: int
    free_before: int
    num_weights: int
    sparsity: float

    @property
    def reuse_fraction(self) -> float:
        return self.reused / self.kept if self.kept else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "earlier": list(self.earlier), "reuse_fraction": self.reuse_fraction}


@dataclass
class GrownTicket:
    """The result of :func:`grow_ticket`: the new ticket's id, its search (None without one), its retraining
    losses (one per epoch) and its :class:`GrowthReport`."""
    ticket: int
    search: SearchResult | None
    retrain_losses: list[float]
    report: GrowthReport


def _earlier(routed: RoutedModel, ticket: int, earlier: Sequence[int] | None) -> list[int]:
    routed.tickets.check_index(ticket)
    out = [k for k in range(routed.num_tickets) if k != ticket] if earlier is None else list(earlier)
    for k in out:
        routed.tickets.check_index(k)
        if k == ticket:
            raise TicketError(f"ticket {ticket} is listed among its own earlier tickets; list only the others.")
    return out


def free_entries(routed: RoutedModel, ticket: int, *, earlier: Sequence[int] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, bool mask)]`` for EVERY parameter of the model: the entries ``ticket`` may change, i.e.
    the ones it owns that none of ``earlier`` (default: every other ticket) owns; all-False (a 0-dim mask)
    for parameters outside the ticket space. The ``owned=`` argument of a MaskedUpdate."""
    earlier = _earlier(routed, ticket, earlier)
    taken: dict[int, torch.Tensor] = {}
    for k in earlier:
        for p, m in ticket_param_masks(routed, k):
            taken[id(p)] = m if id(p) not in taken else taken[id(p)] | m
    allowed = {id(p): m & ~taken[id(p)] if id(p) in taken else m for p, m in ticket_param_masks(routed, ticket)}
    out = []
    for p in routed.parameters():
        m = allowed.get(id(p))
        out.append((p, m if m is not None else torch.zeros((), dtype=torch.bool, device=p.device)))
    return out


def growth_report(routed: RoutedModel, ticket: int, *, earlier: Sequence[int] | None = None) -> GrowthReport:
    """Count what ``ticket`` reuses from ``earlier`` (default: every other ticket) and what it adds."""
    earlier = _earlier(routed, ticket, earlier)
    elem = routed.tickets.element_masks()
    kept = reused = free = 0
    for m in elem.values():
        mine = m[ticket]
        taken = m[earlier].any(0) if earlier else torch.zeros_like(mine)
        kept += int(mine.sum())
        reused += int((mine & taken).sum())
        free += int((~taken).sum())
    total = routed.space.num_weights
    return GrowthReport(ticket=int(ticket), earlier=tuple(earlier), kept=kept, reused=reused, added=kept - reused,
                        free_before=free, num_weights=total, sparsity=1.0 - kept / total)


class _BufferGuard:
    """Restores every buffer a training step changed except the newcomer's own rows of routed norm statistics:
    shared buffers (``shared_norm=True`` norms, any other running state) belong to the earlier tickets too."""

    def __init__(self, routed: RoutedModel, ticket: int):
        self.ticket = ticket
        self.items = [(m, name) for m in routed.model.modules() for name, b in m._buffers.items() if b is not None]

    def __enter__(self):
        self.saved = [b.detach().clone() for b in (m._buffers[n] for m, n in self.items)]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for (m, name), old in zip(self.items, self.saved):
                b = m._buffers[name]
                keep = b[self.ticket].clone() if isinstance(m, RoutedBatchNorm) and b.dim() and \
                    b.shape[0] == m.num_tickets else None
                b.copy_(old)
                if keep is not None:
                    b[self.ticket] = keep
        return False


def newcomer_train_step(routed: RoutedModel, ticket: int, base_step: TrainStep | None = None, *,
                        loss_fn: Callable | None = None, earlier: Sequence[int] | None = None) -> TrainStep:
    """``base_step`` (default: cross-entropy on ``(x, y)``) run inside a MaskedUpdate that lets it change only
    :func:`free_entries` of ``ticket`` (the free entries follow the ticket's masks as its search prunes them);
    buffers are restored after the step except ``ticket``'s own rows of routed norm statistics (with
    ``shared_norm=True`` the newcomer therefore keeps the shared running statistics unchanged)."""
    if base_step is not None and not callable(base_step):
        raise DataError(f"train_step must be callable (model, batch, optimizer) -> loss, got {type(base_step).__name__}.")
    earlier = _earlier(routed, ticket, earlier)
    base = base_step or default_train_step(loss_fn)
    cache: dict = {}
    buffers: dict = {}

    def step(model, batch, optimizer):
        key = (routed.tickets.version, id(routed.tickets))
        if cache.get("key") != key:
            cache["key"], cache["owned"] = key, free_entries(routed, ticket, earlier=earlier)
        with _BufferGuard(routed, ticket), MaskedUpdate(routed, ticket, buffers, owned=cache["owned"]):
            return base(model, batch, optimizer)
    return step


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def apply_reuse_budget(routed: RoutedModel, ticket: int, before: dict[str, torch.Tensor], max_reuse: float, *,
                       earlier: Sequence[int] | None = None) -> int:
    """Weight mode: rebalance ``ticket``'s masks, keeping their count, so that at most ``max_reuse`` of its kept
    weights are owned by an earlier ticket: the lowest-|w| reused entries are swapped for the highest-|w| free
    entries of ``before`` (its masks before the last pruning round), so the masks stay nested. Returns how
    many reused entries remain over the budget (0 unless ``before`` held too few free entries)."""
    earlier = _earlier(routed, ticket, earlier)
    masks = routed.tickets.masks
    names = list(routed.space.layers)
    cur = _flat({n: masks[n][ticket] for n in names})
    taken = _flat({n: masks[n][earlier].any(0) if earlier else torch.zeros_like(masks[n][ticket]) for n in names})
    prev = _flat({n: before[n].to(cur.device) for n in names})
    mag = _flat({n: w.detach().abs() for n, w in routed.prunable_weights().items()}).float()
    excess = int((cur & taken).sum()) - math.floor(max_reuse * int(cur.sum()) + 1e-9)
    if excess <= 0:
        return 0
    candidates = prev & ~cur & ~taken
    swap = min(excess, int(candidates.sum()))
    if swap:
        drop = torch.where(cur & taken, mag, torch.full_like(mag, math.inf)).topk(swap, largest=False).indices
        add = torch.where(candidates, mag, torch.full_like(mag, -math.inf)).topk(swap).indices
        cur[drop], cur[add] = False, True
        new, at = {}, 0
        for n in names:
            size = masks[n][ticket].numel()
            new[n] = cur[at:at + size].view_as(masks[n][ticket])
            at += size
        routed.set_ticket(ticket, new)
    return excess - swap


def _search_newcomer(pruner: RTLPruner, k: int, loader, step: TrainStep, make_opt, epochs: int,
                     loss_fn, device, max_reuse: float | None) -> SearchResult:
    """Per-ticket IMP of ticket k alone with the pruner's public steps (each rewind reloads θ, the weights at
    the search start: the earlier tickets' entries are the same there, since no step changed them)."""
    start = {n: m[k].clone() for n, m in pruner.routed.tickets.masks.items()}
    pruner.begin_search([k])
    try:
        pruner.routed.set_ticket(k, start)  # begin_search made it dense: search from the given masks
        while pruner.record_targets(k) is not None:
            pruner.rewind(k)
            loss = pruner.train_ticket(k, loader, train_step=step, optimizer=make_opt(), epochs=epochs, device=device)
            if needs_gradients(pruner.importance):
                estimate_gradients(pruner.routed, k, loader, importance=pruner.importance, loss_fn=loss_fn,
                                   batches=pruner.importance_batches, device=device)
            before = {n: m[k].clone() for n, m in pruner.routed.tickets.masks.items()}
            pruner.prune_round(k, loss=loss)
            if max_reuse is not None and apply_reuse_budget(pruner.routed, k, before, max_reuse):
                warnings.warn(f"ticket {k}: too few free weights left to keep reuse <= {max_reuse}; the masks "
                              "reuse more (raise max_reuse or prune less per round).", RuntimeWarning, stacklevel=3)
    except BaseException:
        pruner.abandon_search()
        raise
    return pruner.finish_search()


def _check_grow_args(routed, loader, epochs_per_round, retrain_epochs, max_reuse, search) -> None:
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"grow_ticket needs a RoutedModel (rtl.wrap(model, K)), got {type(routed).__name__}.")
    normalize_subsets({0: loader})  # a loader with batches
    for name, v in (("epochs_per_round", epochs_per_round), ("retrain_epochs", retrain_epochs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and name == "epochs_per_round"):
            raise DataError(f"{name} must be an int >= {0 if name == 'retrain_epochs' else 1}, got {v!r}.")
    if max_reuse is not None:
        if isinstance(max_reuse, bool) or not isinstance(max_reuse, (int, float)) or not 0.0 <= max_reuse <= 1.0:
            raise SparsityError(f"max_reuse must be a fraction in [0, 1] or None, got {max_reuse!r}.")
        if routed.granularity != "weight" or not search:
            raise SparsityError("max_reuse= applies to the search in weight granularity; drop it (channel tickets "
                                "or search=False) or wrap the model with granularity='weight'.")


def grow_ticket(routed: RoutedModel, loader, *, masks: dict | None = None, norm_init="mean", search: bool = True,
                max_reuse: float | None = None,
                epochs_per_round: int = 1, retrain_epochs: int = 1, optimizer: torch.optim.Optimizer | None = None,
                train_step: TrainStep | None = None, loss_fn: Callable | None = None, device=None,
                **pruner_options) -> GrownTicket:
    """Add ticket K to ``routed`` and find and train it on ``loader`` (the new data) without changing tickets
    0..K-1: their outputs stay bit-identical (same weights, same norm statistics).

    Args:
        masks: the newcomer's starting masks (default dense): the search prunes from them (its masks stay
            inside them); with ``search=False`` they are its final masks.
        norm_init: its norm statistics' start, see :meth:`RoutedModel.add_ticket`.
        max_reuse: weight mode, an overlap budget: at most this fraction of the newcomer's kept weights may be
            ones an earlier ticket owns (read-only reuse); after each pruning round the lowest-magnitude reused
            weights are swapped for free ones (see :func:`apply_reuse_budget`). None: no budget (magnitude
            pruning then tends to keep the earlier tickets' trained weights and add few).
        search: run per-ticket IMP with rewinding on ``loader`` (``pruner_options`` go to :class:`RTLPruner`,
            e.g. ``sparsities=[0.5, 0.75]``, ``prune_fraction=``, ``importance=``; default: the pruner's).
        epochs_per_round, retrain_epochs: passes over ``loader`` per pruning round, and after the search.
        optimizer: an optimizer instance over ``routed.parameters()`` cloned fresh for every round and for the
            retraining (default Adam lr 1e-3); ``train_step``/``loss_fn``: as in ``find_tickets``.
    """
    _check_grow_args(routed, loader, epochs_per_round, retrain_epochs, max_reuse, search)
    make_opt = fresh_optimizers(routed, optimizer)
    pruner = RTLPruner(routed, **{"progress": False, **pruner_options})  # options checked before K grows
    k = routed.add_ticket(masks, norm_init=norm_init)
    step = newcomer_train_step(routed, k, train_step, loss_fn=loss_fn)
    result = _search_newcomer(pruner, k, loader, step, make_opt, epochs_per_round, loss_fn, device,
                                max_reuse) if search else None
    opt = make_opt()  # one optimizer (one state) over the whole retraining
    losses = [pruner.train_ticket(k, loader, train_step=step, optimizer=opt, device=device)
              for _ in range(retrain_epochs)]
    return GrownTicket(ticket=k, search=result, retrain_losses=losses, report=growth_report(routed, k))
