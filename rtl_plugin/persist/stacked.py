"""K slim channel tickets of one architecture run as ONE grouped network (a channel package's grouped path).

Every layer's K per-ticket tensors are stacked along a new ticket dimension, padded to the widest ticket with
zero channels at the end of each dimension (running variances padded with 1), so a padded channel of a conv /
linear / BatchNorm outputs exactly 0 and no consumer reads it (its input columns are zero). Ticket 0's modules
serve as the template: while a grouped call runs, its conv / linear / BatchNorm forwards are patched to the
grouped ones of ``rtl_plugin.grouped`` over the stacked tensors of the tickets present. Where every ticket has
the same shape (e.g. tickets keeping the same number of channels per group) the slim models' tensors become
views of the stacks, so nothing is stored twice.

Models whose tickets differ in module structure, hold parameters in other layers (LayerNorm, GroupNorm, ...),
use grouped convs whose group count changes between tickets, or whose grouped output differs from the
per-ticket output on the first batch (``verify``; e.g. channel concatenations of unequal widths) fall back to the
per-ticket path; ``blocker`` says why.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from rtl_plugin.grouped import GroupLayout, layer_forward, layer_kind, run_grouped
from rtl_plugin.norms import grouped_batch_norm

_BatchNorm = nn.modules.batchnorm._BatchNorm


class _Unsupported(Exception):
    pass


def _stack(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """[K, *widest shape] holding each tensor in its leading corner, ``fill`` elsewhere; equal shapes: the
    tensors become views of the stack."""
    shapes = [tuple(t.shape) for t in tensors]
    if len({len(s) for s in shapes}) != 1:
        raise _Unsupported(f"tensors of different ranks {shapes}")
    widest = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
    ref = tensors[0]
    out = torch.full((len(tensors),) + widest, fill, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        for k, t in enumerate(tensors):
            out[k][tuple(slice(0, n) for n in t.shape)].copy_(t)
    if len(set(shapes)) == 1:
        for k, t in enumerate(tensors):
            t.data = out[k]
    return out


def _conv_groups(group: list[nn.Module], weight: torch.Tensor) -> int:
    if len({tuple(m.weight.shape) for m in group}) == 1 or all(m.groups == 1 for m in group):
        return group[0].groups
    if all(m.groups == m.in_channels == m.out_channels for m in group):  # depthwise: padded to the widest
        return weight.shape[1]
    raise _Unsupported("a grouped convolution whose group count differs between tickets")


class StackedTickets:
    """The grouped path of K slim models (``tickets``, eval mode, one architecture pruned K ways)."""

    def __init__(self, tickets: list[nn.Module]):
        self.tickets = list(tickets)
        self.template = self.tickets[0]
        self.specs: dict[str, dict] = {}
        self.blocker: str | None = None
        self.verified = False
        try:
            self._build()
        except _Unsupported as e:
            self.blocker, self.specs = str(e), {}
        # listed once: a grouped call checks these against the stacks (module moves drop the whole object)
        self._tensors = [t for m in self.tickets for t in list(m.parameters()) + list(m.buffers())]
        self._versions = self.versions()

    def versions(self) -> tuple:
        """Version counters and storages of every ticket tensor: changes when a weight is edited or moved."""
        return tuple((t._version, t.data_ptr()) for t in self._tensors)

    def stale(self) -> bool:
        return self.versions() != self._versions

    def _build(self) -> None:
        trees = [dict(t.named_modules()) for t in self.tickets]
        names = list(trees[0])
        if any(list(tr) != names or any(type(tr[n]) is not type(trees[0][n]) for n in names) for tr in trees):
            raise _Unsupported("the tickets' module trees differ")
        for n in names:
            m = trees[0][n]
            if not list(m.parameters(recurse=False)) and not list(m.buffers(recurse=False)):
                continue
            group = [tr[n] for tr in trees]
            if layer_kind(m) is not None:
                w = _stack([g.weight for g in group], 0.0)
                b = None if m.bias is None else _stack([g.bias for g in group], 0.0)
                self.specs[n] = {"weight": w, "bias": b, "groups": _conv_groups(group, w) if
                                 layer_kind(m) != "linear" else None}
            elif isinstance(m, _BatchNorm) and m.running_mean is not None:
                self.specs[n] = {"mean": _stack([g.running_mean for g in group], 0.0),
                                 "var": _stack([g.running_var for g in group], 1.0),
                                 "weight": None if m.weight is None else _stack([g.weight for g in group], 0.0),
                                 "bias": None if m.bias is None else _stack([g.bias for g in group], 0.0)}
            else:
                raise _Unsupported(f"module {n!r} ({type(m).__name__}) holds tensors and is not a plain conv, "
                                   "linear or BatchNorm with running statistics")

    def _forwards(self, layout: GroupLayout) -> dict:
        ids, every = layout.ticket_ids, layout.all_of(len(self.tickets))

        def sel(t):
            return None if t is None else (t if every else t.index_select(0, ids))
        forwards = {}
        for n, spec in self.specs.items():
            m = self.template.get_submodule(n)
            if "mean" in spec:
                affine = self._eval_affine(n, m, spec)
                forwards[m] = (lambda x, m=m, a=affine: grouped_batch_norm(m, x, layout, affine=(sel(a[0]), sel(a[1]))))
            else:
                forwards[m] = layer_forward(m, lambda s=spec: sel(s["weight"]), lambda s=spec: sel(s["bias"]),
                                            groups=spec["groups"])
        return forwards

    def _eval_affine(self, name: str, m: nn.Module, spec: dict) -> tuple:
        """The K tickets' eval normalisation ``(scale, shift)`` [K, C] of BatchNorm ``name``, computed once."""
        if "affine" not in spec:
            with torch.no_grad():
                scale = torch.rsqrt(spec["var"] + m.eps)
                if spec["weight"] is not None:
                    scale = scale * spec["weight"]
                shift = -spec["mean"] * scale if spec["bias"] is None else spec["bias"] - spec["mean"] * scale
            spec["affine"] = (scale, shift)
        return spec["affine"]

    def run(self, args: tuple, kwargs: dict, route: torch.Tensor):
        """The tickets' outputs for a batch routed by ``route`` [B], in one grouped forward."""
        layout = GroupLayout(route)
        return run_grouped(lambda a, kw: self.template(*a, **kw), args, kwargs, layout, self._forwards(layout))

    def verify(self, args: tuple, kwargs: dict, *, tol: float = 1e-4) -> None:
        """Compare the grouped path with each slim model on the first samples of a batch (every ticket); a
        difference above ``tol`` (relative to the largest output) sets ``blocker``."""
        x = args[0]
        n, K = min(2, x.shape[0]), len(self.tickets)
        B = x.shape[0]
        probe = tuple(a[:n].repeat(K, *[1] * (a.dim() - 1)) if isinstance(a, torch.Tensor) and a.dim() and
                      a.shape[0] == B else a for a in args)
        route = torch.arange(K, device=x.device).repeat_interleave(n)
        sub = tuple(a[:n] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else a for a in args)
        with torch.no_grad():
            got = self.run(probe, kwargs, route)
            want = [self.tickets[k](*sub, **kwargs) for k in range(K)]
        if not isinstance(got, torch.Tensor) or not all(isinstance(w, torch.Tensor) for w in want):
            self.blocker = "grouped channel packages need a model that returns one tensor"
            return
        want = torch.cat(want)
        err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
        scale = max(float(want.float().abs().max()) if want.numel() else 0.0, 1e-12)
        if got.shape != want.shape or err > tol * scale:
            self.blocker = (f"the grouped tickets differ from the slim models on the first batch (max difference "
                            f"{err:.3g}, largest output {scale:.3g}): the channel padding does not line up in this "
                            "architecture (e.g. a concatenation of unequal widths)")
        self.verified = True
