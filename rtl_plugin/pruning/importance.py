"""TicketImportance: a torch-pruning importance that ranks channels by what ticket k keeps, so a stock
``tp.pruner.BasePruner`` can hard-prune one ticket inside an existing pruning script."""
from __future__ import annotations

import torch

from rtl_plugin import _tp
from rtl_plugin.errors import LiveRoutedModelError
from rtl_plugin.routed import RoutedModel


class TicketImportance:
    """A torch-pruning importance that ranks channels by what ticket k keeps (interop with stock tp pruners).

    ``tp.pruner.BasePruner(routed.plain_copy(k), example_inputs, importance=TicketImportance(routed, k), ...)``
    hard-prunes first the channels ticket k does not use: channel mode, channels the ticket drops get
    -inf and kept ones the base importance; weight mode, a channel's score is the L1 norm of ticket k's
    kept weights in it (0 when the ticket keeps none).

    Args:
        routed: the RoutedModel whose ticket defines the ranking.
        k: ticket id.
        base: a tp importance for kept channels (default ``GroupMagnitudeImportance(p=1)``).

    Raises LiveRoutedModelError when ``routed`` is not the RoutedModel (e.g. ``routed.ticket_module(k)`` or
    ``routed.model``) and when asked to rank a group of the live routed model itself: prune ``plain_copy(k)``.
    """

    def __init__(self, routed, k: int, base=None):
        if not isinstance(routed, RoutedModel):
            raise LiveRoutedModelError(
                f"TicketImportance(routed, k) takes the RoutedModel itself as the source of ticket k, got "
                f"{type(routed).__name__} (a ticket_module(k) view or routed.model is not accepted); prune a plain "
                "copy with it: tp.pruner.BasePruner(routed.plain_copy(k), example_inputs, "
                "importance=TicketImportance(routed, k), ...).")
        routed.tickets.check_index(k)
        self.routed = routed
        self.k = int(k)
        self.base = base or _tp.default_importance()

    def _full_name(self, name: str | None) -> str | None:
        if name is None:
            return None
        trace_root = self.routed.space.trace_root
        return f"{trace_root}.{name}" if trace_root else name

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        self._refuse_live_group(group)
        base = self.base(group)
        if base is None:
            return None
        n = len(group[0].idxs)
        if self.routed.granularity == "channel":
            kv = self.routed.tickets.masks.get(self._full_name(_tp.module_name(group, _tp.item_module(group[0]))))
            if kv is None or kv.shape[1] != n:
                return base
            keep = kv[self.k].to(base.device)
            return torch.where(keep, base, torch.full_like(base, -float("inf")))
        return self._kept_weight_l1(group, n, base.device)

    def _refuse_live_group(self, group) -> None:
        root, _ = _tp.group_root(group)
        if any(root is m for m in self.routed.model.modules()):
            raise LiveRoutedModelError(
                "TicketImportance was asked to rank a group of the live routed model, whose weights every ticket "
                "shares: pruning it would cut all tickets. Build the pruner on a plain copy: "
                "tp.pruner.BasePruner(routed.plain_copy(k), example_inputs, importance=TicketImportance(routed, k), "
                "...), or take rtl.export_ticket(routed, k).")

    def _kept_weight_l1(self, group, n: int, device) -> torch.Tensor:
        """Weight mode: per-channel L1 of the ticket's kept weights over the group's out-channel layers."""
        score = torch.zeros(n, device=device)
        masks, weights = self.routed.tickets.masks, self.routed.prunable_weights()
        for item in group:
            mfull = self._full_name(_tp.module_name(group, _tp.item_module(item)))
            if mfull is None or mfull not in masks or not _tp.is_out_channel_item(group, item):
                continue
            w = weights[mfull]
            m = masks[mfull][self.k]
            kind = self.routed.space.layer_kinds[mfull]
            wm = (w * m).abs()
            per_out = wm.transpose(0, 1).flatten(1).sum(1) if kind == "convT" else wm.flatten(1).sum(1)
            root_idxs = torch.as_tensor(item.root_idxs, device=device)
            score.index_add_(0, root_idxs, per_out[torch.as_tensor(item.idxs)].to(score.device).float())
        return score
