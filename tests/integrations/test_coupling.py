"""Channel couplings torch-pruning enforces are enforced on ticket masks too, and what channel mode cannot
reproduce is refused at wrap with its cause: tied channels (ghost modules), channel splits (Res2Net / MixNet
chunks), whole attention heads, weight-standardised convs, a graph that does not converge (time guard), and
weight mode on models torch-pruning cannot trace (module-walk fallback)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import rtl_plugin as rtl

K = 3
NF_SMALL = dict(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128), stem_chs=16)  # a 56K-weight NF-ResNet


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Ghost(nn.Module):
    """GhostNet's bottleneck: a primary conv and a depthwise 'cheap' conv of it, concatenated, plus a shortcut.
    Channels i and i + C/2 of the sum both come from primary channel i."""

    def __init__(self, cin: int = 3, c: int = 8):
        super().__init__()
        self.c = c
        self.primary = nn.Sequential(nn.Conv2d(cin, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2, bias=False),
                                   nn.BatchNorm2d(c // 2))
        self.short = nn.Conv2d(cin, c, 1)
        self.out = nn.Conv2d(c, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        p = self.primary(x)
        y = torch.cat([p, self.cheap(p)], 1)[:, :self.c] + self.short(x)
        return self.head(self.out(y).mean((2, 3)))


class MixedSplit(nn.Module):
    """A channel split whose chunks are read by layers the graph walk meets in reverse order (MixNet / Res2Net)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.proj = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 3)

    def splits(self) -> list[int]:
        return [self.a.in_channels, self.b.in_channels]  # read from the layers: pruning updates them

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        xa, xb = torch.split(x, self.splits(), 1)
        x = torch.cat([self.b(xb), self.a(xa)], 1)  # the later chunk is consumed first
        return self.head(self.proj(x).mean((2, 3)))


class FixedSplit(MixedSplit):
    """The same, with split sizes kept in a Python attribute that a pruned copy does not update."""

    def __init__(self):
        super().__init__()
        self.sizes = [4, 6]

    def splits(self) -> list[int]:
        return self.sizes


class ChannelMeanNorm(nn.Module):
    """Parameter-free: divides by the mean over channels, which a physically pruned copy computes over fewer."""

    def forward(self, x):
        return x / (x.abs().mean(1, keepdim=True) + 1.0)


class MeanNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.cnorm = ChannelMeanNorm()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv2(self.cnorm(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class PartialResidual(nn.Module):
    """ReXNet's partial residual ``cat([x[:, :c] + s, x[:, c:]])``, stacked: torch-pruning's propagation loops."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList()
        c = 8
        for _ in range(depth):
            self.blocks.append(nn.Conv2d(c, c + 4, 1))
            c += 4
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.blocks:
            c = x.shape[1]
            y = conv(x)
            x = torch.cat([y[:, :c] + x, y[:, c:]], 1)
        return self.head(x.mean((2, 3)))


def _wrap(model, granularity="channel", **kw):
    torch.manual_seed(0)
    return rtl.wrap(model, K, example_inputs=torch.randn(1, 3, 8, 8), granularity=granularity, adapter="generic",
                    output_layers=["head"], **kw)


def _exact(r, x, tickets, tol=1e-5):
    r.set_tickets(tickets)
    r.eval()
    with torch.no_grad():
        for k in range(K):
            assert _rel(rtl.export_ticket(r, k)(x), r(x, route=k)) < tol


# --------------------------------------------------------------------------- tied channels
def test_ghost_module_ties_primary_and_cheap_channels():
    torch.manual_seed(0)
    r = _wrap(Ghost())
    grp = next(g for g in r.space.groups if g.root == "short")
    assert grp.ties == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # masks that let tied channels differ: the space applies the coupling (keep only when both are kept)
    keep = torch.ones(K, grp.size, dtype=torch.bool)
    keep[0, 0] = False              # channel 0 dropped, its tie kept
    keep[1, grp.ties[1][1]] = False  # the other member of a class dropped
    masks = {g.root: torch.ones(K, g.size, dtype=torch.bool) for g in r.space.groups}
    masks[grp.root] = keep
    eff = grp.effective_keep(keep)
    assert not eff[0, grp.ties[0]].any() and not eff[1, grp.ties[1]].any() and eff[2].all()
    _exact(r, torch.randn(2, 3, 8, 8), rtl.TicketSet(r.space, masks))


def test_random_tickets_draw_tied_classes_together():
    r = _wrap(Ghost())
    t = rtl.TicketSet.random(r.space, K, keep=0.5, seed=3)
    for g in r.space.groups:
        m = t.masks[g.root]
        assert torch.equal(m, g.effective_keep(m)), g.root  # already coupled
        assert m.any(1).all()


# --------------------------------------------------------------------------- splits
def test_split_chunks_reach_their_layers_and_export_exactly():
    r = _wrap(MixedSplit())
    groups = {g.root: {(it.module, it.out): it.index_pairs()[0] for it in g.items} for g in r.space.groups}
    # depthwise a reads chunk 0 (stem channels 0-3), b chunk 1 (4-9); the concat puts b first in proj's input
    assert groups["a"][("stem", True)] == [0, 1, 2, 3] and groups["a"][("proj", False)] == [6, 7, 8, 9]
    assert groups["b"][("stem", True)] == [4, 5, 6, 7, 8, 9] and groups["b"][("proj", False)] == list(range(6))
    _exact(r, torch.randn(2, 3, 8, 8), rtl.TicketSet.random(r.space, K, keep=0.6, seed=1))


# --------------------------------------------------------------------------- export checks at wrap / export
def test_channel_mode_refuses_a_model_whose_export_differs_naming_the_layer():
    with pytest.raises(rtl.UnsupportedLayerError, match=r"cannot export .*'cnorm'"):
        _wrap(MeanNormNet())
    r = _wrap(MeanNormNet(), check_export=False)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.5, seed=0))
    with pytest.raises(rtl.ExportMismatchError, match=r"first diverging layer: 'cnorm' \(ChannelMeanNorm\)"):
        rtl.export_ticket(r, 1)
    slim = rtl.export_ticket(r, 1, verify=False)  # opt-out: the caller takes responsibility
    assert isinstance(slim, MeanNormNet)


def test_export_package_inherits_the_check(tmp_path):
    r = _wrap(MeanNormNet(), check_export=False)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.5, seed=0))
    with pytest.raises(rtl.ExportMismatchError, match="cnorm"):
        rtl.export_package(r, tmp_path / "pkg", example_inputs=torch.randn(2, 3, 8, 8))
    assert not (tmp_path / "pkg" / "manifest.json").exists()


def test_export_that_cannot_run_is_an_export_error_naming_the_layer():
    with pytest.raises(rtl.UnsupportedLayerError, match=r"cannot run: layer <FixedSplit> raises RuntimeError: "
                                                        r"split_with_sizes"):
        _wrap(FixedSplit())
    r = _wrap(FixedSplit(), check_export=False)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.6, seed=1))
    with pytest.raises(rtl.ExportError, match=r"cannot run: layer <FixedSplit>"):
        rtl.export_ticket(r, 0, check_inputs=torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------- time guard
def test_non_converging_graph_is_refused_quickly_naming_weight_mode():
    t = time.monotonic()
    with pytest.raises(rtl.GraphTimeoutError, match=r"PartialResidual.*granularity='weight'"):
        _wrap(PartialResidual())
    assert time.monotonic() - t < 30
    r = _wrap(PartialResidual(), granularity="weight")  # weight mode needs no channel groups
    assert len(r.space.layers) == 7


def test_graph_timeout_is_enforced():
    with pytest.raises(rtl.GraphTimeoutError, match=r"1e-09 s .*limit.*granularity='weight'"):
        _wrap(Ghost(), graph_timeout=1e-9)
    with pytest.raises(rtl.SpaceError, match="graph_timeout"):
        _wrap(Ghost(), graph_timeout=0)


def test_deadline_is_checked_inside_group_building_and_tp_is_restored():
    from torch_pruning.dependency.group import Group

    from rtl_plugin import _tp
    before = (Group.add_dep, Group.add_and_merge)
    dg = _tp.build_graph(Ghost(), torch.randn(1, 3, 8, 8))
    with pytest.raises(_tp.GroupingStopped) as info:
        _tp.all_groups_tied(dg, [], deadline=time.monotonic() - 1.0)
    assert info.value.reason == "timeout" and info.value.module is not None
    assert (Group.add_dep, Group.add_and_merge) == before and "get_pruning_group" not in vars(dg)
    grouped = _tp.all_groups_tied(dg, [], deadline=time.monotonic() + 60)  # the same graph still groups
    assert [[0, 4], [1, 5], [2, 6], [3, 7]] in [ties for _, ties in grouped]


# --------------------------------------------------------------------------- weight mode without a graph
class Untraceable(nn.Module):
    """Runs fine, but its forward hides the conv output from autograd, so torch-pruning cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(3, 4, 1)  # never runs: not part of the space
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y = y.detach().requires_grad_(torch.is_grad_enabled())  # cuts the autograd graph between the layers
        return self.head(y.mean((2, 3)))


def test_weight_mode_walks_the_modules_when_tp_cannot_trace(monkeypatch):
    from rtl_plugin import _tp

    def refuse(*a, **k):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(_tp, "build_graph", refuse)  # what tp raises on DPN / CS3-DarkNet
    r = _wrap(Untraceable(), granularity="weight")
    assert list(r.space.layers) == ["conv"]  # ran, not the output layer, not the unused conv
    with pytest.raises(rtl.UnsupportedLayerError, match=r"cannot trace Untraceable .*runs on the example input.*"
                                                        r"granularity='weight'"):
        _wrap(Untraceable())
    with pytest.raises(rtl.SpaceError, match="failed on example_inputs"):
        rtl.wrap(Untraceable(), K, example_inputs=torch.randn(1, 5, 8, 8), adapter="generic", output_layers=["head"])


# --------------------------------------------------------------------------- attention heads, std convs
def test_vit_channel_tickets_keep_whole_heads_and_export_exactly():
    import timm
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    r = rtl.wrap(m, K, granularity="channel", example_inputs=torch.randn(1, 3, 32, 32))
    qkv = next(g for g in r.space.groups if g.root == "blocks.0.attn.qkv")
    heads, head_dim = m.blocks[0].attn.num_heads, m.blocks[0].attn.head_dim
    assert len(qkv.ties) == heads and all(len(c) == 3 * head_dim for c in qkv.ties)
    _exact(r, torch.randn(2, 3, 32, 32), rtl.TicketSet.random(r.space, K, keep=0.6, seed=2), tol=1e-4)
    slim = rtl.export_ticket(r, 0)
    assert slim.blocks[0].attn.num_heads * slim.blocks[0].attn.head_dim * 3 == slim.blocks[0].attn.qkv.out_features
    with pytest.raises(rtl.SpaceError, match="num_heads"):
        rtl.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), K,
                 granularity="channel", example_inputs=torch.randn(1, 3, 32, 32), num_heads={"blocks.0.attn.qkv": 5})


def test_weight_standardised_convs_export_exactly_and_reload(tmp_path):
    import timm
    torch.manual_seed(0)
    m = timm.create_model("nf_resnet26", num_classes=3, **NF_SMALL)
    r = rtl.wrap(m, K, granularity="channel", example_inputs=torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    _exact(r, x, rtl.TicketSet.random(r.space, K, keep=0.6, seed=2), tol=1e-4)
    rtl.export_package(r, tmp_path / "pkg", example_inputs=x)
    torch.manual_seed(1)
    slim = rtl.load_package(tmp_path / "pkg", timm.create_model("nf_resnet26", num_classes=3, **NF_SMALL))
    with torch.no_grad():
        assert _rel(slim(x, route=torch.tensor([1, 2])), r(x, route=torch.tensor([1, 2]))) < 1e-4
