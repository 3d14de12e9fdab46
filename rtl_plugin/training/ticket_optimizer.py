"""Masked optimizer steps for any plain PyTorch loop: :class:`TicketOptimizer`.

It is a ``torch.optim.Optimizer`` (so torch LR schedulers, gradient clipping helpers and trainers accept it)
wrapping the user's optimizer. ``step(ticket=k)`` (or ``select(k)`` then ``step()``) is ticket k's masked
update: every entry ticket k does not own (prunable weights outside its masks and, in channel mode, the
biases / norm affine parameters of the channels it drops) is bit-identical after the step, whatever the
optimizer (SGD momentum, Adam, AdamW weight decay, RMSprop...).

Per-ticket state (default): one clone of the user's optimizer per ticket (same class and hyper-parameters,
separate momentum / moments), so ticket j's history never pushes ticket k's weights. The clones, the user's
optimizer and the TicketOptimizer share the SAME ``param_groups`` list and group dicts, so an LR scheduler
built on any of them (or a manual ``group["lr"] = ...``) reaches every ticket's state at once.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Iterable

import torch

from rtl_plugin.errors import OptimizerError, TicketError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.training.masked import MaskedUpdate, union_param_masks, write_back_needed
from rtl_plugin.training.optim import check_optimizer, clone_optimizer

__all__ = ["TicketOptimizer"]


def _ticket_key(routed, ticket) -> int | tuple[int, ...]:
    """``k`` for one ticket; a sorted tuple of the distinct ids for several (e.g. ``range(K)`` or a route tensor
    whose samples go to more than one ticket)."""
    K = routed.num_tickets
    if isinstance(ticket, torch.Tensor):
        if ticket.dtype.is_floating_point or ticket.dtype.is_complex or ticket.dtype == torch.bool or ticket.dim() > 1:
            raise TicketError(f"ticket must be an int, a sequence of ints or an integer tensor of ticket ids, got a "
                              f"{ticket.dtype} tensor of shape {tuple(ticket.shape)}.")
        ticket = ticket.item() if ticket.dim() == 0 else ticket.unique().tolist()
    one = not isinstance(ticket, Iterable) or isinstance(ticket, (str, bytes))
    try:
        if isinstance(ticket, bool) or (not one and any(isinstance(t, bool) for t in ticket)):
            raise TypeError
        ids = sorted({operator.index(t) for t in ([ticket] if one else ticket)})
    except TypeError:
        raise TicketError(f"ticket must be an int in [0, {K}) or a sequence of them, got {ticket!r}.") from None
    if not ids or not 0 <= ids[0] <= ids[-1] < K:
        raise TicketError(f"ticket ids must be ints in [0, {K}) (the model routes {K} tickets), got {ticket!r}.")
    return ids[0] if len(ids) == 1 else tuple(ids)


class TicketOptimizer(torch.optim.Optimizer):
    """Ticket-masked steps of ``optimizer`` (an optimizer instance over ``routed.parameters()``).

    Args:
        routed: the RoutedModel whose tickets the steps respect (its current masks, re-read after changes).
        optimizer: the user's optimizer; its ``param_groups`` become this object's ``param_groups``.
        per_ticket_state: True (default): one fresh clone per ticket (separate state, shared param groups).
            False: the user's optimizer itself (its state, shared by every ticket) takes every step.
        write_back: True (default): snapshot what the stepping ticket does not own and restore it after the
            step (the guarantee for any loss and optimizer; two passes over the ticket's parameters per
            step). None: automatic, for losses that come only from the routed forward (no penalty on raw
            parameters): skipped while :func:`write_back_needed` proves it a no-op, switched on for good after
            a mask change or a ``load_state_dict``. False: never (you guarantee it yourself).

    Usage in a plain loop::

        topt = TicketOptimizer(routed, torch.optim.AdamW(routed.parameters(), lr=1e-3, weight_decay=0.05))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=epochs)
        for x, y, route in loader:                    # e.g. batch_sampler=RouteBalancedSampler(...)
            k = int(route[0])
            topt.zero_grad()
            F.cross_entropy(routed(x, route=k), y).backward()
            topt.step(ticket=k)                       # or topt.select(k); ...; topt.step()
        sched.step()

    ``with topt.select(k): ...`` masks the whole block (snapshot at entry, restore at exit; ``step()`` inside
    does not snapshot again), for a train step that may write parameters itself. A step over several
    tickets at once (``step(ticket=[0, 2])``, e.g. a mixed-route batch) needs ``per_ticket_state=False``;
    it may change what any of them owns.

    Per-ticket states live in ``optimizer_for(k).state``; ``state`` is the selected ticket's.
    ``state_dict()`` / ``load_state_dict()`` cover every ticket's state. Under torchrun the gradients must
    be averaged by the forward you use (``joint_retrain`` / ``mixed_route_retrain`` do it, or the views of
    :func:`rtl_plugin.training.distributed.ticket_views`); this class only steps.
    """

    def __init__(self, routed, optimizer: torch.optim.Optimizer, *, per_ticket_state: bool = True,
                 write_back: bool | None = True):
        if not isinstance(routed, RoutedModel):
            raise TypeError(f"TicketOptimizer needs a RoutedModel (rtl.wrap(model, K, ...)), got {type(routed).__name__}.")
        if isinstance(optimizer, TicketOptimizer):
            raise OptimizerError("optimizer is already a TicketOptimizer; pass the torch optimizer it wraps "
                                 "(ticket_optimizer.base) instead.")
        check_optimizer(routed, optimizer)
        if not isinstance(per_ticket_state, bool):
            raise OptimizerError(f"per_ticket_state must be True or False, got {per_ticket_state!r}.")
        if write_back is not None and not isinstance(write_back, bool):
            raise OptimizerError(f"write_back must be True, False or None (automatic), got {write_back!r}.")
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.routed, self.base, self.per_ticket_state = routed, optimizer, per_ticket_state
        self.param_groups = optimizer.param_groups  # the same list and dicts: lr changes reach every state
        self.defaults = optimizer.defaults
        self._opts = {k: self._clone() for k in range(routed.num_tickets)} if per_ticket_state else {}
        self._auto = write_back is None
        self._write_back = write_back_needed(routed, list(self._opts.values()) or [optimizer], per_ticket_state) \
            if self._auto else write_back
        self._updates: dict = {}
        self._buffers: dict = {}
        self._masks_version = self._current_masks()
        self._ticket = None
        self._active = None  # the MaskedUpdate of an open ``with select(k)`` block
        self.state = optimizer.state if not per_ticket_state else defaultdict(dict)

    def _clone(self) -> torch.optim.Optimizer:
        c = clone_optimizer(self.base)
        c.param_groups = self.base.param_groups
        return c

    def _current_masks(self):
        return id(self.routed.tickets), self.routed.tickets.version

    # ------------------------------------------------------------------ selection
    @property
    def ticket(self):
        """The selected ticket (an int, a tuple of ids for a several-ticket step, or None)."""
        return self._ticket

    @property
    def write_back(self) -> bool:
        """Whether the next step snapshots and restores the entries the stepping ticket does not own."""
        return self._write_back or (self._auto and self._current_masks() != self._masks_version)

    def optimizer_for(self, ticket: int) -> torch.optim.Optimizer:
        """The torch optimizer that takes ticket ``ticket``'s steps (the user's one without per-ticket state)."""
        key = _ticket_key(self.routed, ticket)
        if not isinstance(key, int):
            raise TicketError("optimizer_for takes one ticket id.")
        return self._opts[key] if self.per_ticket_state else self.base

    def select(self, ticket) -> "TicketOptimizer":
        """Make ``ticket`` (an int, or several ids for a mixed-route step) the one ``step()`` updates; returns
        self, so ``with topt.select(k): ...`` masks a whole train step."""
        if self._active is not None:
            raise TicketError("select() inside an open 'with ticket_optimizer.select(k)' block; leave it first.")
        key = _ticket_key(self.routed, ticket)
        if self.per_ticket_state and not isinstance(key, int):
            raise OptimizerError(f"a step over several tickets {list(key)} needs one shared optimizer state; build "
                                 "the TicketOptimizer with per_ticket_state=False (or step one ticket at a time).")
        self._ticket = key
        self.state = self.optimizer_for(key).state if self.per_ticket_state else self.base.state
        return self

    def _masked_update(self, key) -> MaskedUpdate:
        version = self._current_masks()
        if version != self._masks_version:  # new masks: the cached entries are stale
            self._updates, self._masks_version = {}, version
            if self._auto:  # states now hold moments on entries the tickets no longer own
                self._write_back = True
        upd = self._updates.get(key)
        if upd is None:
            if isinstance(key, int):
                upd = MaskedUpdate(self.routed, key, buffers=self._buffers, write_back=self._write_back)
            else:
                upd = MaskedUpdate(self.routed, None, buffers=self._buffers, write_back=self._write_back,
                                   owned=union_param_masks(self.routed, key))
            self._updates[key] = upd
        return upd

    def __enter__(self):
        if self._ticket is None:
            raise TicketError("'with ticket_optimizer:' needs a ticket: write 'with ticket_optimizer.select(k):'.")
        if self._active is not None:
            raise TicketError("'with ticket_optimizer.select(k)' blocks cannot be nested.")
        self._active = self._masked_update(self._ticket)
        self._active.__enter__()
        return self

    def __exit__(self, *exc):
        active, self._active = self._active, None
        return active.__exit__(*exc)

    # ------------------------------------------------------------------ the step
    def step(self, closure=None, *, ticket=None):
        """Ticket ``ticket``'s masked step (default: the selected ticket); returns the closure's loss."""
        if ticket is not None:
            key = _ticket_key(self.routed, ticket)
            if self._active is not None and key != self._ticket:
                raise TicketError(f"step(ticket={ticket!r}) inside the block of ticket {self._ticket}; step that "
                                  "ticket or leave the block first.")
            if key != self._ticket:
                self.select(key)
        if self._ticket is None:
            raise TicketError("no ticket selected: call step(ticket=k) or select(k) first.")
        inner = self.optimizer_for(self._ticket) if isinstance(self._ticket, int) else self.base
        if self.per_ticket_state:
            self.base._opt_called = True  # torch LR schedulers built on the user's optimizer read this flag
        if self._active is not None:
            return inner.step(closure)
        with self._masked_update(self._ticket):
            return inner.step(closure)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"per_ticket_state": bool, "optimizers": {"0": sd, "1": sd, ...}}`` (or ``{"shared": sd}``)."""
        opts = {str(k): o for k, o in self._opts.items()} if self.per_ticket_state else {"shared": self.base}
        return {"per_ticket_state": self.per_ticket_state, "optimizers": {n: o.state_dict() for n, o in opts.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s states (any subset of the tickets); keeps the param groups shared."""
        try:
            saved, per_ticket = state_dict["optimizers"], state_dict["per_ticket_state"]
        except (KeyError, TypeError):
            raise OptimizerError("load_state_dict expects TicketOptimizer.state_dict()'s output "
                                 "({'per_ticket_state': ..., 'optimizers': {...}}).") from None
        names = set(map(str, self._opts)) if self.per_ticket_state else {"shared"}
        if per_ticket != self.per_ticket_state or not set(saved) <= names:
            raise OptimizerError(f"the saved state (per_ticket_state={per_ticket}, optimizers {sorted(saved)}) does "
                                 f"not fit this TicketOptimizer (per_ticket_state={self.per_ticket_state}); build it "
                                 "with the same per_ticket_state and number of tickets.")
        groups = self.base.param_groups
        for name, sd in saved.items():
            opt = self.base if name == "shared" else self._opts[int(name)]
            opt.load_state_dict(sd)  # torch builds new group dicts: copy their values into the shared ones
            for shared, loaded in zip(groups, opt.param_groups):
                shared.update({key: v for key, v in loaded.items() if key != "params"})
            opt.param_groups = groups
        if self._auto:
            self._write_back, self._updates = True, {}  # restored states are not known to be safe to skip
        if not self.per_ticket_state:
            self.state = self.base.state  # torch replaced the state dict
        elif isinstance(self._ticket, int):
            self.state = self._opts[self._ticket].state

    def __repr__(self) -> str:
        state = "per-ticket" if self.per_ticket_state else "shared"
        return f"TicketOptimizer({type(self.base).__name__}, {state} state, tickets={self.routed.num_tickets})"

