"""TicketSpace: what can be masked, derived once from torch-pruning's dependency graph.

Keyed by module *names* (never module objects), so it survives deepcopy, DDP wrapping, norm swapping
and checkpoints, and serialises to JSON.

Granularities
-------------
``weight``  element-wise masks on the ``weight`` of every conv/linear layer in the graph, minus output
            layers and ``ignored_layers`` (the paper's setting).
``channel`` one keep-vector per coupled channel group ``[K, C_root]``; per-layer masks are gathers
            through each group item's ``root_idxs``, ANDed where a layer belongs to several groups.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import SpaceError, UnsupportedLayerError

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

    @property
    def period(self) -> int:
        return self.size // self.ch_groups


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
            kv = keep[g.root]
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
                                   items=[ChannelItem(**it) for it in g["items"]]) for g in d["groups"]]
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


def _trace(root: nn.Module, example_inputs, customized_pruners):
    try:
        return _tp.build_graph(root, example_inputs, customized_pruners=customized_pruners)
    except Exception as e:  # tp raises many exception types while tracing
        raise SpaceError(f"torch-pruning could not trace the model ({type(e).__name__}: {e}). Check that "
                         f"example_inputs match the model's forward() (got "
                         f"{getattr(example_inputs, 'shape', type(example_inputs))}).") from e


def _weight_layers(dg, name_of: dict, excluded: set) -> tuple[dict[str, list[int]], dict[str, str], dict[str, int]]:
    """``(layers, kinds, conv_groups)`` of the prunable conv/linear layers in the graph, in module order."""
    graph_mods = [m for m in _tp.graph_modules(dg) if m in name_of]
    layers: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    conv_groups: dict[str, int] = {}
    order = {m: i for i, m in enumerate(name_of)}
    for m in sorted(graph_mods, key=order.__getitem__):
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


def _check_channel_target(target: nn.Module, tname: str, root_name: str, custom: tuple) -> bool:
    """True when ``target`` needs a channel mask; raises for layers channel mode cannot mask."""
    is_custom = any((target is c) or (isinstance(c, type) and isinstance(target, c)) for c in custom)
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
    if isinstance(target, nn.GroupNorm):
        raise UnsupportedLayerError(
            f"channel mode does not support GroupNorm yet ({tname!r}). Use granularity='weight'.")
    return True


def _channel_group(dg, grp, name_of: dict, custom: tuple) -> ChannelGroup | None:
    """One tp group as a ChannelGroup (None when its root is outside the traced names)."""
    root_module, size = _tp.group_root(grp)
    root_name = name_of.get(root_module)
    if root_name is None:
        return None
    chg = 1
    items: list[ChannelItem] = []
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
            raise UnsupportedLayerError(
                f"channel group {root_name!r} maps to channel {max(idxs)} of layer {tname!r} which has only "
                f"{n_ch} channels: a broadcast multiply (attention gate such as SCSE) falsely couples "
                "channels. Use granularity='weight', put that attention module in ignored_layers, or "
                "register a customized pruner.")
        if root_idxs and max(root_idxs) >= size:
            raise UnsupportedLayerError(f"inconsistent root indices in group {root_name!r} at {tname!r}.")
        chg = max(chg, _channel_groups_of(target))
        full = idxs == list(range(n_ch))
        items.append(ChannelItem(module=tname, out=is_out, size=int(n_ch), idxs=None if full else idxs,
                                 root_idxs=None if root_idxs == idxs else root_idxs))
    if size % chg:
        raise UnsupportedLayerError(f"group {root_name!r} has {size} channels, not divisible by its {chg} channel groups.")
    return ChannelGroup(root=root_name, size=size, ch_groups=chg, items=items)


def _channel_groups(dg, name_of: dict, ignored_mods: list, customized_pruners) -> list[ChannelGroup]:
    try:
        tp_groups = _tp.all_groups(dg, ignored_mods)
    except (IndexError, RuntimeError, ValueError) as e:
        raise UnsupportedLayerError(
            f"torch-pruning failed to build channel groups ({type(e).__name__}: {e}). This usually comes from a "
            "broadcast multiply (e.g. smp's SCSE attention) coupling a 1-channel tensor to C channels. Use "
            "granularity='weight', put the attention module in ignored_layers, or register a customized pruner.") from e
    custom = tuple(customized_pruners or ())
    groups = [g for g in (_channel_group(dg, grp, name_of, custom) for grp in tp_groups) if g is not None]
    if not groups:
        raise SpaceError("no prunable channel groups found (every group touches an output or ignored layer).")
    return groups


def build_space(model: nn.Module, example_inputs, *, granularity: str = "weight",
                output_layers: Sequence[str | nn.Module] = (), ignored_layers: Sequence[str | nn.Module] = (),
                customized_pruners: dict | None = None, trace_root: str = "") -> TicketSpace:
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
    Raises:
        SpaceError / UnsupportedLayerError with the offending module's name.
    """
    if granularity not in GRANULARITIES:
        raise SpaceError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if not isinstance(model, nn.Module):
        raise SpaceError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
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
    dg = _trace(root, example_inputs, customized_pruners)
    layers, kinds, conv_groups = _weight_layers(dg, name_of, excluded)
    groups: list[ChannelGroup] = []
    if granularity == "channel":
        groups = _channel_groups(dg, name_of, [by_name[n] for n in excluded if n in by_name], customized_pruners)
    shape = list(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None
    return TicketSpace(granularity=granularity, layers=layers, output_layers=out_names, ignored_layers=ign_names,
                       groups=groups, layer_kinds=kinds, conv_groups=conv_groups, example_input_shape=shape,
                       trace_root=trace_root, fingerprint=architecture_fingerprint(model))
