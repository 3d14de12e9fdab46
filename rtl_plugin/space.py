"""TicketSpace: what can be masked, derived once from torch-pruning's dependency graph.

Keyed by module *names* (never module objects), so it survives deepcopy, DDP wrapping, norm swapping
and checkpoints, and serialises to JSON.

Granularities
-------------
``weight``  element-wise masks on the ``weight`` of every conv/linear layer in the graph, minus output
            layers and ``ignored_layers`` (the paper's setting).
``channel`` one keep-vector per coupled channel group ``[K, C_root]``; per-layer masks are gathers
            through each group item's ``root_idxs``, ANDed where a layer belongs to several groups.
            Couplings torch-pruning enforces when it prunes are enforced on the keep-vectors too
            (``ChannelGroup.effective_keep``): the same position in every channel group (grouped /
            depthwise convs), and tie classes (``ChannelGroup.ties``): root channels tp maps onto one
            channel (GhostNet), the same position of every chunk of a fixed-size split (Res2Net), whole
            attention heads (``num_heads``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin._classes import merge_classes
from rtl_plugin.errors import GraphTimeoutError, SpaceError, UnsupportedLayerError

GRANULARITIES = ("weight", "channel")

# Layer types whose channel items we know how to mask with activation masks.
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
_ELEMENTWISE_OK = (nn.PReLU,)


@dataclass
class ChannelItem:
    """One layer touched by a channel group: ``mask[idxs] &= keep[root_idxs]`` on its out or in side."""
    module: str
    out: bool               # True: output channels of `module`; False: its input channels
    size: int               # number of channels on that side of the module
    idxs: list[int] | None  # None means range(size)
    root_idxs: list[int] | None  # None means equal to idxs

    def index_pairs(self) -> tuple[list[int], list[int]]:
        idxs = list(range(self.size)) if self.idxs is None else self.idxs
        root = idxs if self.root_idxs is None else self.root_idxs
        return idxs, root


@dataclass
class ChannelGroup:
    """A set of coupled channels that must be kept or dropped together."""
    root: str               # name of the root conv/linear (out-channel pruning)
    size: int               # C_root
    ch_groups: int          # >1: grouped conv / group norm in the group; keep positions tile with period size // ch_groups
    items: list[ChannelItem] = field(default_factory=list)
    ties: list[list[int]] | None = None  # classes of root channels kept or dropped together (tied channels, heads)

    @property
    def period(self) -> int:
        return self.size // self.ch_groups

    def effective_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """The keep-vectors ``[K, C_root]`` torch-pruning can realise: a root channel is kept only when every
        channel it is coupled to is kept (the same position in every channel group, every member of its tie
        class). Masks that already respect the couplings are returned unchanged."""
        K = keep.shape[0]
        kv = keep
        if self.ch_groups > 1:
            kv = kv.view(K, self.ch_groups, self.period).all(1, keepdim=True).expand(K, self.ch_groups, self.period)
            kv = kv.reshape(K, self.size)
        if self.ties:
            cls = torch.arange(self.size, device=kv.device)
            for c in self.ties:
                cls[torch.as_tensor(c, dtype=torch.long, device=kv.device)] = c[0]
            idx = cls.expand(K, self.size)
            per_class = torch.ones(K, self.size, dtype=torch.uint8, device=kv.device)
            per_class = per_class.scatter_reduce(1, idx, kv.to(torch.uint8), reduce="amin")
            kv = per_class.gather(1, idx).bool()
        return kv

    def coupled_classes(self) -> torch.Tensor:
        """``[C_root]`` id of each root channel's coupled class (channel-group tiling and ties), its smallest member."""
        cls = torch.arange(self.size)
        if self.ch_groups > 1:
            cls = cls % self.period
        for c in self.ties or ():
            members = torch.as_tensor(c, dtype=torch.long)
            cls = torch.where(torch.isin(cls, cls[members]), cls[members].min(), cls)
        return cls

    def random_keep(self, num_tickets: int, keep: float, generator: torch.Generator) -> torch.Tensor:
        """Random coupled keep-vectors ``[K, C_root]``: one draw per coupled class, >= 1 class kept per ticket."""
        cls = self.coupled_classes()
        draw = torch.rand(num_tickets, self.size, generator=generator) < keep
        first = cls[torch.randint(self.size, (num_tickets,), generator=generator)]
        draw[torch.arange(num_tickets), first] = True
        return draw[:, cls]


@dataclass
class TicketSpace:
    """The masked coordinates of one architecture.

    Attributes:
        granularity: "weight" or "channel".
        layers: prunable weight tensors, ``{module_name: weight_shape}`` (counted for sparsity in both modes).
        output_layers / ignored_layers: module names excluded from pruning.
        groups: channel groups (channel mode only).
        layer_kinds: ``{module_name: "conv" | "convT" | "linear"}`` plus conv groups for element expansion.
        conv_groups: ``{module_name: groups}`` for grouped convs (weight-element expansion).
        example_input_shape: shape used for tracing (needed to re-trace at export time).
        trace_root: name of the submodule that was traced ("" = the whole model).
        fingerprint: architecture hash of the model's parameter names and shapes.
    """
    granularity: str
    layers: dict[str, list[int]]
    output_layers: list[str]
    ignored_layers: list[str]
    groups: list[ChannelGroup]
    layer_kinds: dict[str, str]
    conv_groups: dict[str, int]
    example_input_shape: list[int] | None
    trace_root: str
    fingerprint: str

    # ----------------------------------------------------------------- derived views
    @property
    def num_weights(self) -> int:
        """Total prunable weights (elements) in the space."""
        n = 0
        for shape in self.layers.values():
            c = 1
            for s in shape:
                c *= s
            n += c
        return n

    def mask_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one ticket's mask per key: weight shapes, or ``(C_root,)`` per channel group."""
        if self.granularity == "weight":
            return {k: tuple(v) for k, v in self.layers.items()}
        return {g.root: (g.size,) for g in self.groups}

    def channel_layer_masks(self, keep: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer channel masks from group keep-vectors.

        Args:
            keep: ``{group_root: BoolTensor[K, C_root]}``.
        Returns:
            ``{module_name: {"out": BoolTensor[K, C_out], "in": BoolTensor[K, C_in]}}`` (sides absent
            when no group touches them).
        """
        if self.granularity != "channel":
            raise SpaceError("channel_layer_masks() needs a channel-granularity space; build it with granularity='channel'.")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for g in self.groups:
            kv = g.effective_keep(keep[g.root])
            for it in g.items:
                side = "out" if it.out else "in"
                slot = out.setdefault(it.module, {})
                if side not in slot:
                    slot[side] = torch.ones(kv.shape[0], it.size, dtype=torch.bool, device=kv.device)
                idxs, root = it.index_pairs()
                idx_t = torch.as_tensor(idxs, dtype=torch.long, device=kv.device)
                root_t = torch.as_tensor(root, dtype=torch.long, device=kv.device)
                slot[side][:, idx_t] &= kv[:, root_t]
        return out

    def weight_element_masks(self, layer_masks: dict[str, dict[str, torch.Tensor]], num_tickets: int,
                             device=None) -> dict[str, torch.Tensor]:
        """Expand channel masks into element masks ``{layer: BoolTensor[K, *weight_shape]}`` for counting."""
        res = {}
        for name, shape in self.layers.items():
            lm = layer_masks.get(name, {})
            g = self.conv_groups.get(name, 1)
            # weight rows index the output channels (conv, linear) or the input channels (transposed conv);
            # columns index the other side within the row's channel group
            row_side, col_side = ("in", "out") if self.layer_kinds[name] == "convT" else ("out", "in")
            n_rows, per_g_cols = shape[0], shape[1]
            rows = lm.get(row_side)
            cols = lm.get(col_side)
            if rows is None:
                rows = torch.ones(num_tickets, n_rows, dtype=torch.bool, device=device)
            if cols is None:
                cols = torch.ones(num_tickets, per_g_cols * g, dtype=torch.bool, device=device)
            col_idx = (torch.arange(n_rows, device=rows.device) // (n_rows // g))[:, None] * per_g_cols + \
                torch.arange(per_g_cols, device=rows.device)[None, :]
            m = rows[:, :, None] & cols[:, col_idx]
            m = m.reshape(num_tickets, shape[0], shape[1], *([1] * (len(shape) - 2)))
            res[name] = m.expand(num_tickets, *shape)
        return res

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TicketSpace":
        try:
            groups = [ChannelGroup(root=g["root"], size=int(g["size"]), ch_groups=int(g["ch_groups"]),
                                   items=[ChannelItem(**it) for it in g["items"]], ties=g.get("ties"))
                      for g in d["groups"]]
            return cls(granularity=d["granularity"], layers={k: list(v) for k, v in d["layers"].items()},
                       output_layers=list(d["output_layers"]), ignored_layers=list(d["ignored_layers"]),
                       groups=groups, layer_kinds=dict(d["layer_kinds"]), conv_groups=dict(d["conv_groups"]),
                       example_input_shape=d.get("example_input_shape"), trace_root=d.get("trace_root", ""),
                       fingerprint=d["fingerprint"])
        except (KeyError, TypeError) as e:
            raise SpaceError(f"ticket space description is malformed ({e!r}); re-create it with build_space().") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "TicketSpace":
        return cls.from_dict(json.loads(s))

    def summary(self) -> str:
        def top(names):  # containers only, not every expanded submodule
            return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        lines = [f"TicketSpace granularity={self.granularity}",
                 f"  prunable layers: {len(self.layers)}  prunable weights: {self.num_weights:,}",
                 f"  output layers (not pruned): {', '.join(top(self.output_layers)) or '-'}",
                 f"  ignored layers: {', '.join(top(self.ignored_layers)) or '-'}"]
        if self.granularity == "channel":
            lines.append(f"  channel groups: {len(self.groups)}  channels: {sum(g.size for g in self.groups):,}")
            for g in self.groups[:12]:
                extra = f" ch_groups={g.ch_groups}" if g.ch_groups > 1 else ""
                lines.append(f"    {g.root:<40s} C={g.size:<5d} layers={len(g.items)}{extra}")
            if len(self.groups) > 12:
                lines.append(f"    ... {len(self.groups) - 12} more groups")
        return "\n".join(lines)


# --------------------------------------------------------------------------- building
def architecture_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names and shapes (norm buffers excluded: routed norms reshape them)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:32]


def _expand_names(model: nn.Module, names: Iterable[str | nn.Module], what: str) -> list[str]:
    """Names of the given modules and all their submodules (tp does not expand containers itself)."""
    by_name = dict(model.named_modules())
    by_obj = {m: n for n, m in model.named_modules()}
    out: list[str] = []
    for n in names:
        if isinstance(n, nn.Module):
            if n not in by_obj:
                raise SpaceError(f"{what}: module {type(n).__name__} is not part of the model; pass a submodule of the model or its name.")
            n = by_obj[n]
        if n not in by_name:
            raise SpaceError(f"{what}: no module named {n!r} in the model; use a name from model.named_modules().")
        for sub, _ in by_name[n].named_modules(prefix=n):
            out.append(sub)
    return sorted(set(out))


def _channel_groups_of(m: nn.Module) -> int:
    if _tp.is_conv(m) and m.groups > 1 and m.groups != m.out_channels:
        return int(m.groups)
    if isinstance(m, nn.GroupNorm):
        return int(m.num_groups)
    return 1


def _layer_kind(m: nn.Module) -> str:
    if _tp.is_linear(m):
        return "linear"
    return "convT" if getattr(m, "transposed", False) else "conv"


def model_label(model: nn.Module) -> str:
    """A short name of the architecture for messages (timm's architecture name when there is one)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__} ({arch})" if arch else type(model).__name__


def _as_args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _run_forward(root: nn.Module, example_inputs, hooks_on: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """Run ``root`` once in eval mode without gradients; returns the ``hooks_on`` modules that ran, in order.
    A failing forward is the caller's input problem: SpaceError naming it."""
    ran: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in hooks_on]
    was = root.training
    try:
        root.eval()
        with torch.no_grad():
            root(*_as_args(example_inputs))
    except Exception as e:  # any model error: the input does not fit forward()
        raise SpaceError(f"the model failed on example_inputs ({type(e).__name__}: {e}); pass an input that "
                         f"matches its forward() (got {getattr(example_inputs, 'shape', type(example_inputs))}).") from e
    finally:
        root.train(was)
        for h in handles:
            h.remove()
    return ran


_TRACE_CAUSES = {  # torch-pruning step that failed -> the pattern behind it
    "update_reshape_index_mapping": ": a reshape of the channel dimension it cannot map, such as ShuffleNet's "
                                    "channel shuffle view(B, groups, C // groups, H, W)",
    "update_concat_index_mapping": ": a concat whose input widths it cannot infer (sliced or dual-path "
                                   "features, as in DPN or CSP-DarkNet blocks)",
    "update_split_index_mapping": ": a split whose chunk widths it cannot infer",
}


def _trace(root: nn.Module, example_inputs, customized_pruners, label: str, granularity: str):
    """tp's dependency graph of ``root``. When tp fails, the forward is run alone to tell a bad input
    (SpaceError about example_inputs) from a model tp cannot trace (UnsupportedLayerError naming weight mode)."""
    try:
        return _tp.build_graph(root, example_inputs, customized_pruners=customized_pruners)
    except Exception as e:  # tp raises many exception types while tracing
        _run_forward(root, example_inputs)
        cause = _TRACE_CAUSES.get(_tp.failing_step(e), "")
        raise UnsupportedLayerError(
            f"torch-pruning cannot trace {label} ({type(e).__name__}: {e}){cause}; the model itself runs on the "
            f"example input, so {granularity} granularity is unavailable for it. Use granularity='weight' (element "
            "masks need no dependency graph), or register a customized pruner for the layer tp fails on.") from e


def _collect_weight_layers(mods: Iterable[nn.Module], name_of: dict,
                           excluded: set) -> tuple[dict[str, list[int]], dict[str, str], dict[str, int]]:
    """``(layers, kinds, conv_groups)`` of the prunable conv/linear layers among ``mods``, in module order."""
    layers: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    conv_groups: dict[str, int] = {}
    order = {m: i for i, m in enumerate(name_of)}
    for m in sorted(set(m for m in mods if m in name_of), key=order.__getitem__):
        n = name_of[m]
        if not _tp.is_prunable_weight_layer(m) or n in excluded:
            continue
        layers[n] = list(m.weight.shape)
        kinds[n] = _layer_kind(m)
        if _tp.is_conv(m) and m.groups > 1:
            conv_groups[n] = int(m.groups)
    if not layers:
        raise SpaceError("the model has no prunable conv/linear weights outside the output/ignored layers; "
                         "check output_layers/ignored_layers or that example_inputs reach the layers.")
    return layers, kinds, conv_groups


def _weight_layers(dg, name_of: dict, excluded: set) -> tuple[dict[str, list[int]], dict[str, str], dict[str, int]]:
    """``(layers, kinds, conv_groups)`` of the prunable conv/linear layers in tp's graph, in module order."""
    return _collect_weight_layers(_tp.graph_modules(dg), name_of, excluded)


def _walked_weight_layers(root: nn.Module, example_inputs, name_of: dict, excluded: set):
    """Weight mode without a dependency graph: the conv/linear modules the forward runs, found by walking
    the modules (element masks need no channel coupling)."""
    candidates = [m for m in root.modules() if _tp.is_prunable_weight_layer(m)]
    return _collect_weight_layers(_run_forward(root, example_inputs, candidates), name_of, excluded)


def _check_channel_target(target: nn.Module, tname: str, root_name: str, custom: tuple) -> bool:
    """True when ``target`` needs a channel mask; raises for layers channel mode cannot mask."""
    is_custom = any((target is c) or (isinstance(c, type) and isinstance(target, c)) for c in custom)
    if isinstance(target, nn.GroupNorm) and not is_custom:
        raise UnsupportedLayerError(
            f"channel mode does not support GroupNorm yet ({tname!r}, {type(target).__name__}): a physically "
            "pruned group norm normalises over fewer channels per group. Use granularity='weight', or put the "
            "layer in ignored_layers.")
    if not (_tp.is_conv(target) or _tp.is_linear(target) or isinstance(target, _NORM_TYPES + _ELEMENTWISE_OK)
            or is_custom):
        if not list(target.parameters(recurse=False)):
            return False  # parameter-free modules (activations, pooling) need no mask
        raise UnsupportedLayerError(
            f"channel mode cannot mask layer {tname!r} ({type(target).__name__}) coupled to group {root_name!r}. "
            "Use granularity='weight', add it to ignored_layers, or pass a customized pruner for it.")
    if isinstance(target, nn.LayerNorm) and len(target.normalized_shape) != 1:
        raise UnsupportedLayerError(
            f"channel mode supports LayerNorm over one (channel) dimension only; {tname!r} normalises "
            f"over {tuple(target.normalized_shape)}. Use granularity='weight' or ignore it.")
    return True


def _head_chunks(name: str, out_ch: int, heads: int) -> int:
    """1 for a per-projection layer (q, k or v: ``[heads, head_dim]``), 3 for a fused qkv layer
    (``[3, heads, head_dim]``, recognised by "qkv" in its name)."""
    chunks = 3 if "qkv" in name.rsplit(".", 1)[-1].lower() else 1
    if out_ch % (chunks * heads):
        raise SpaceError(f"num_heads: layer {name!r} has {out_ch} output channels, not divisible into "
                         f"{chunks} x {heads} heads; give the number of heads of that attention layer.")
    return chunks


def _head_ties(name: str, out_ch: int, heads: int, idxs: list[int], roots: list[int]) -> list[list[int]]:
    """Root channels of one attention head of layer ``name`` (its q, k and v parts) form one tie class, so a
    ticket keeps or drops whole heads: exported attention then keeps its head size and its softmax scale."""
    head_dim = out_ch // (_head_chunks(name, out_ch, heads) * heads)
    by_head: dict[int, list[int]] = {}
    for i, r in zip(idxs, roots):
        by_head.setdefault((i // head_dim) % heads, []).append(r)
    return list(by_head.values())


def _index_error(root_name: str, tname: str, idx: int, n_ch: int, kinds: set[str]) -> UnsupportedLayerError:
    """The true cause of a group index beyond a layer's channels: split/concat mapping or a broadcast."""
    fix = (f"Use granularity='weight', put {tname!r} (or the block around it) in ignored_layers, or register a "
           "customized pruner for it.")
    if kinds & {"split", "concat", "slice"}:
        return UnsupportedLayerError(
            f"channel group {root_name!r} maps to channel {idx} of layer {tname!r}, which has only {n_ch} "
            f"channels: torch-pruning's index mapping through {'/'.join(sorted(kinds & {'split', 'concat', 'slice'}))} "
            f"(a split + concat pattern such as CSP or Res2Net blocks) sends channels to the wrong layer. {fix}")
    if kinds & {"reshape", "unbind", "expand"}:
        return UnsupportedLayerError(
            f"channel group {root_name!r} maps to channel {idx} of layer {tname!r}, which has only {n_ch} channels: "
            "torch-pruning's index mapping through a reshape/broadcast (attention that folds heads into another "
            f"dimension or shares keys/values across heads) sends channels to the wrong layer. {fix}")
    return UnsupportedLayerError(
        f"channel group {root_name!r} maps to channel {idx} of layer {tname!r}, which has only {n_ch} channels: a "
        f"broadcast multiply (an attention gate such as SCSE) couples a 1-channel tensor to C channels. {fix}")


def _channel_group(dg, grp, tp_ties: list[list[int]], name_of: dict, custom: tuple,
                   heads: dict[str, int]) -> ChannelGroup | None:
    """One tp group as a ChannelGroup (None when its root is outside the traced names)."""
    root_module, size = _tp.group_root(grp)
    root_name = name_of.get(root_module)
    if root_name is None:
        return None
    chg = 1
    items: list[ChannelItem] = []
    ties = list(tp_ties)
    for target, is_out, idxs, root_idxs in _tp.group_items(dg, grp):
        if not isinstance(target, nn.Module) or target not in name_of:
            continue  # tp virtual ops (concat, split, add) and unwrapped nn.Parameters
        tname = name_of[target]
        if not _check_channel_target(target, tname, root_name, custom):
            continue
        n_ch = _tp.out_channels(dg, target) if is_out else _tp.in_channels(dg, target)
        if n_ch is None:
            continue
        if idxs and (max(idxs) >= n_ch or min(idxs) < 0):
            raise _index_error(root_name, tname, max(idxs), n_ch, _tp.group_op_kinds(grp))
        if root_idxs and max(root_idxs) >= size:
            raise UnsupportedLayerError(f"inconsistent root indices in group {root_name!r} at {tname!r}.")
        if is_out and tname in heads:
            ties += _head_ties(tname, int(n_ch), heads[tname], idxs, root_idxs)
        chg = max(chg, _channel_groups_of(target))
        full = idxs == list(range(n_ch))
        items.append(ChannelItem(module=tname, out=is_out, size=int(n_ch), idxs=None if full else idxs,
                                 root_idxs=None if root_idxs == idxs else root_idxs))
    if size % chg:
        raise UnsupportedLayerError(f"group {root_name!r} has {size} channels, not divisible by its {chg} channel groups.")
    return ChannelGroup(root=root_name, size=size, ch_groups=chg, items=items, ties=merge_classes(ties) or None)


def _stopped_error(e: _tp.GroupingStopped, name_of: dict, label: str, timeout: float) -> UnsupportedLayerError:
    where = name_of.get(e.module, type(e.module).__name__ if e.module is not None else "?")
    alt = "Use granularity='weight' (element masks need no channel groups)"
    if e.reason == "timeout":
        return GraphTimeoutError(
            f"building the channel groups of {label} passed the {timeout:g} s limit (at layer {where!r}); "
            f"torch-pruning's index propagation does not converge on this model. {alt}, or raise graph_timeout= "
            "if the model is just very large.")
    if e.reason == "explosion":
        return GraphTimeoutError(
            f"building the channel groups of {label} does not converge: the group of layer {where!r} grew to "
            f"{e.items} dependencies: torch-pruning's index propagation loops on this model (as on ReXNet's "
            f"partial residual cat([x[:, :c] + s, x[:, c:]])). {alt}, or put that block in ignored_layers.")
    cause = e.__cause__
    return UnsupportedLayerError(
        f"torch-pruning failed to build the channel group of layer {where!r} in {label} "
        f"({type(cause).__name__}: {cause}); its index mapping cannot follow this pattern (a broadcast multiply "
        f"such as smp's SCSE attention, or a split/concat). {alt}, put the block in ignored_layers, or register "
        "a customized pruner.")


def _channel_groups(dg, name_of: dict, ignored_mods: list, customized_pruners, heads: dict[str, int], *,
                    deadline: float, timeout: float, label: str) -> list[ChannelGroup]:
    if time.monotonic() > deadline:
        raise GraphTimeoutError(f"tracing {label} took longer than the {timeout:g} s graph limit. Use "
                                "granularity='weight', or raise graph_timeout= if the model is just very large.")
    try:  # a legitimate group adds each graph node a few times at most (measured <= 1x on timm models)
        tp_groups = _tp.all_groups_tied(dg, ignored_mods, deadline=deadline, max_items=4 * _tp.node_count(dg) + 256)
    except _tp.GroupingStopped as e:
        raise _stopped_error(e, name_of, label, timeout) from e.__cause__
    custom = tuple(customized_pruners or ())
    groups = [g for g in (_channel_group(dg, grp, ties, name_of, custom, heads) for grp, ties in tp_groups)
              if g is not None]
    if not groups:
        raise SpaceError("no prunable channel groups found (every group touches an output or ignored layer).")
    missing = sorted(set(heads) - {it.module for g in groups for it in g.items if it.out})
    if missing:
        raise SpaceError(f"num_heads names {missing}, which no channel group prunes on its output side; give the "
                         "attention's q/k/v (or fused qkv) projection layers.")
    return groups


def _check_heads(model: nn.Module, num_heads) -> dict[str, int]:
    by_name = dict(model.named_modules())
    by_obj = {m: n for n, m in by_name.items()}
    if num_heads is None:
        return {}
    if not isinstance(num_heads, dict):
        raise SpaceError(f"num_heads must be a dict {{qkv layer (name or module): number of heads}}, got "
                         f"{type(num_heads).__name__}.")
    out = {}
    for k, h in num_heads.items():
        name = by_obj.get(k) if isinstance(k, nn.Module) else k
        if name not in by_name or not _tp.is_linear(by_name[name]) and not _tp.is_conv(by_name[name]):
            raise SpaceError(f"num_heads key {k!r} is not a linear/conv layer of the model; use the name of the "
                             "attention's qkv (or q/k/v) projection from model.named_modules().")
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise SpaceError(f"num_heads[{name!r}] must be a positive int, got {h!r}.")
        out[name] = h
    return out


def build_space(model: nn.Module, example_inputs, *, granularity: str = "weight",
                output_layers: Sequence[str | nn.Module] = (), ignored_layers: Sequence[str | nn.Module] = (),
                customized_pruners: dict | None = None, trace_root: str = "", num_heads: dict | None = None,
                graph_timeout: float = 120.0) -> TicketSpace:
    """Build the ticket space of ``model`` from torch-pruning's dependency graph.

    Args:
        model: the network (timm classifier, smp U-Net, audio U-Net, any nn.Module tp can trace).
        example_inputs: a tensor (or tuple) that ``model`` (or ``trace_root``) accepts, e.g. ``[1, 3, 32, 32]``.
        granularity: "weight" (element masks) or "channel" (coupled channel groups).
        output_layers: layers whose outputs are the model's outputs; never pruned.
        ignored_layers: further layers (or containers) never pruned.
        customized_pruners: ``{layer type or instance: tp.pruner.BasePruningFunc}`` for layers tp
            cannot handle; those layers are then trusted in channel mode.
        trace_root: trace only this submodule (e.g. "unet" for the audio U-Net behind an STFT);
            names are still given relative to ``model``.
        num_heads: channel mode, ``{attention q/k/v or fused qkv layer: number of heads}``; tickets then keep
            or drop whole heads (an exported attention keeps its head size).
        graph_timeout: channel mode, seconds allowed for tracing and building the channel groups.
    Weight mode uses tp's graph when tp can trace the model, and otherwise the conv/linear modules the
    forward runs (found by walking the modules).
    Raises:
        SpaceError / UnsupportedLayerError (GraphTimeoutError past ``graph_timeout``) naming the module and the fix.
    """
    if granularity not in GRANULARITIES:
        raise SpaceError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if not isinstance(model, nn.Module):
        raise SpaceError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(graph_timeout, (int, float)) or isinstance(graph_timeout, bool) or not graph_timeout > 0:
        raise SpaceError(f"graph_timeout must be a positive number of seconds, got {graph_timeout!r}.")
    heads = _check_heads(model, num_heads)
    if heads and granularity != "channel":
        raise SpaceError("num_heads= aligns channel tickets with attention heads; it needs granularity='channel'.")
    root = model
    prefix = ""
    if trace_root:
        try:
            root = model.get_submodule(trace_root)
        except AttributeError as e:
            raise SpaceError(f"trace_root {trace_root!r} is not a submodule of the model.") from e
        prefix = trace_root + "."
    out_names = _expand_names(model, output_layers, "output_layers")
    ign_names = _expand_names(model, ignored_layers, "ignored_layers")
    excluded = set(out_names) | set(ign_names)
    name_of = {m: prefix + n if n else trace_root for n, m in root.named_modules()}
    by_name = dict(model.named_modules())
    label = model_label(model)
    deadline = time.monotonic() + float(graph_timeout)
    groups: list[ChannelGroup] = []
    try:
        dg = _trace(root, example_inputs, customized_pruners, label, granularity)
        layers, kinds, conv_groups = _weight_layers(dg, name_of, excluded)
    except UnsupportedLayerError:
        if granularity == "channel":
            raise
        layers, kinds, conv_groups = _walked_weight_layers(root, example_inputs, name_of, excluded)
    if granularity == "channel":
        groups = _channel_groups(dg, name_of, [by_name[n] for n in excluded if n in by_name], customized_pruners,
                                 heads, deadline=deadline, timeout=float(graph_timeout), label=label)
    shape = list(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None
    return TicketSpace(granularity=granularity, layers=layers, output_layers=out_names, ignored_layers=ign_names,
                       groups=groups, layer_kinds=kinds, conv_groups=conv_groups, example_input_shape=shape,
                       trace_root=trace_root, fingerprint=architecture_fingerprint(model))
