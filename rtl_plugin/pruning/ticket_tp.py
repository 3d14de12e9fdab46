"""Channel granularity with torch-pruning's own schedule: each ticket has a stock ``tp.pruner.BasePruner`` over a
plain copy of the model, which tp prunes physically step by step. The channels tp's machinery selects in a step
(its ranking, ratios, ``round_to``, isomorphic scopes, head pruning) become the ticket's dropped mask entries, so
``export_ticket`` of the ticket replays exactly what tp built.

Before each step the copy gets the routed model's current weights, ticket k's norm statistics and the gradients,
gathered through an index copy: a float64 twin of the model whose entries are their own flat positions, pruned
with the same history, so it maps every remaining entry of the slim copy to its entry in the full model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import RTLError
from rtl_plugin.pruning.config import PruningConfig


def _modules_by_name(root: nn.Module, names, prefix: str) -> list[nn.Module]:
    mods = dict(root.named_modules())
    out = []
    for n in names:
        rel = n[len(prefix):] if prefix and n.startswith(prefix) else n
        if rel in mods:
            out.append(mods[rel])
    return out


def tp_arguments(config: PruningConfig, root: nn.Module, prefix: str, excluded: list[str]) -> dict:
    """Keyword arguments of ``tp.pruner.BasePruner`` for ``root`` (the traced model), with the config's
    name-keyed options turned into ``root``'s modules. ``excluded``: layers never pruned (output layers and
    ignored layers of the ticket space). Fresh dicts every call: tp mutates some of them."""
    ratio_dict = {}
    for key, r in config.pruning_ratio_dict.items():
        mods = _modules_by_name(root, key if isinstance(key, tuple) else [key], prefix)
        if mods:
            ratio_dict[tuple(mods) if isinstance(key, tuple) else mods[0]] = r
    heads = {m: h for n, h in config.num_heads.items() for m in _modules_by_name(root, [n], prefix)}
    return dict(pruning_ratio=config.pruning_ratio, pruning_ratio_dict=ratio_dict,
                max_pruning_ratio=config.max_pruning_ratio, iterative_steps=config.iterative_steps,
                iterative_pruning_ratio_scheduler=config.scheduler, global_pruning=config.global_pruning,
                round_to=config.round_to, ignored_layers=_modules_by_name(root, excluded, prefix),
                num_heads=heads, out_channel_groups={}, in_channel_groups={}, **config.tp_options)


def _index_twin(root: nn.Module) -> nn.Module:
    """A float64 copy of ``root`` whose every parameter and float buffer holds its own flat positions."""
    twin = copy.deepcopy(root).double()
    with torch.no_grad():
        for t in list(twin.parameters()) + [b for b in twin.buffers() if b.is_floating_point()]:
            t.copy_(torch.arange(t.numel(), dtype=torch.float64, device=t.device).view_as(t))
    return twin


class TicketTpState:
    """Ticket k's torch-pruning pruner, its physically pruned plain copy and the copy's index twin."""

    def __init__(self, routed, k: int, config: PruningConfig, importance, example_inputs, *, steps_done: int = 0):
        """``steps_done`` > 0 (a resumed search): the copy is pruned to ticket k's current masks by replaying
        their history, after tp recorded the dense model's channel counts."""
        space = routed.space
        self.k = k
        self.prefix = space.trace_root + "." if space.trace_root else ""
        plain = routed.plain_copy(k)
        self.root = plain.get_submodule(space.trace_root) if space.trace_root else plain
        self.twin = _index_twin(self.root)
        excluded = list(space.output_layers) + list(space.ignored_layers)
        with _tp.tracing(self.root):
            self.pruner = _tp.BasePruner(self.root, example_inputs, importance=importance,
                                         **tp_arguments(config, self.root, self.prefix, excluded))
        self.twin_graph = _tp.build_graph(self.twin, _tp_double(example_inputs))
        self.roots = {g.root for g in space.groups}
        if steps_done:
            from rtl_plugin.persist.export import pruning_history  # persist.export imports routed, not the pruner
            _tp.prime_initial_channels(self.pruner)
            history = pruning_history(routed, k)
            _tp.replay_history(self.pruner.DG, history)
            _tp.replay_history(self.twin_graph, history)
            self.pruner.current_step = steps_done

    @property
    def steps_done(self) -> int:
        return self.pruner.current_step

    def load_from(self, routed) -> None:
        """The routed model's current weights, ticket k's norm statistics and the gradients, gathered onto the
        slim copy."""
        full = routed.plain_copy(self.k)
        full_root = full.get_submodule(routed.space.trace_root) if routed.space.trace_root else full
        grads = {n: p.grad for n, p in routed.model.named_parameters() if p.grad is not None}
        twin = dict(self.twin.named_parameters()) | dict(self.twin.named_buffers())
        src = dict(full_root.named_parameters()) | dict(full_root.named_buffers())
        with torch.no_grad():
            for name, t in list(self.root.named_parameters()) + list(self.root.named_buffers()):
                if name not in twin or not t.is_floating_point():
                    continue
                idx = twin[name].detach().long().flatten().to(t.device)
                t.copy_(src[name].detach().flatten()[idx].view_as(t))
                g = grads.get(self.prefix + name)
                if isinstance(t, nn.Parameter):
                    t.grad = None if g is None else g.detach().flatten()[idx].view_as(t).clone()

    def step(self, keep: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """One tp step on the slim copy; returns ``{group root: dropped channel indices of the full model}``
        given ticket k's current keep-vectors ``keep`` (which the slim copy realises)."""
        alive = {r: keep[r].nonzero().flatten().tolist() for r in self.roots}
        dropped: dict[str, list[int]] = {}
        done = len(self.pruner.pruning_history())
        for group in _tp.pruning_groups(self.pruner):
            for module, is_out, idxs in _tp.group_item_pruning(group):
                name = _tp.module_name(group, module)
                full = None if name is None else self.prefix + name
                if is_out and full in alive:
                    if full in dropped:
                        raise RTLError(f"torch-pruning pruned group {full!r} twice in one step; this model's groups "
                                       "overlap in a way RTL cannot map. Use granularity='weight'.")
                    dropped[full] = [alive[full][i] for i in idxs]
            group.prune()
        _tp.replay_history(self.twin_graph, self.pruner.pruning_history()[done:])
        return dropped

    def check(self, keep: dict[str, torch.Tensor]) -> None:
        """RTLError unless every group root of the slim copy has as many output channels as ticket k keeps."""
        mods = dict(self.root.named_modules())
        for r in self.roots:
            rel = r[len(self.prefix):] if self.prefix else r
            n = _tp.out_channels(self.pruner.DG, mods[rel])
            if n is not None and n != int(keep[r].sum()):
                raise RTLError(f"ticket {self.k}: torch-pruning's copy has {n} channels at {r!r} but the ticket keeps "
                               f"{int(keep[r].sum())}; the model's channel coupling is not mapped exactly. Use "
                               "granularity='weight' for this model.")


def _tp_double(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.double() if example_inputs.is_floating_point() else example_inputs
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(_tp_double(x) for x in example_inputs)
    if isinstance(example_inputs, dict):
        return {k: _tp_double(v) for k, v in example_inputs.items()}
    return example_inputs
