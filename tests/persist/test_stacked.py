"""Channel packages run grouped (persist.stacked.StackedTickets): the K slim models as one network, padded to the
widest ticket, equal the per-ticket path; models where the padding cannot line up fall back (auto) or raise
(forced grouped)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import rtl_plugin as rtl
from rtl_plugin.errors import ExecutionError
from rtl_plugin.persist.package import SlimRoutedModel, export_package, load_package
from _helpers import TinyCNN

K = 3
ROUTE = torch.tensor([0, 2, 2, 0, 0, 2, 0])  # ticket 1 absent, uneven buckets


def channel_tickets(space, keeps, seed=1):
    """Channel tickets keeping ``keeps[k]`` of every group's period (different widths per ticket)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in space.groups:
        per = torch.zeros(len(keeps), grp.period, dtype=torch.bool)
        for k, keep in enumerate(keeps):
            per[k, torch.randperm(grp.period, generator=g)[:max(1, round(grp.period * keep))]] = True
        masks[grp.root] = per.repeat(1, grp.ch_groups)
    return rtl.TicketSet(space, masks)


def _package(tmp_path, make_model, x1, keeps, **wrap_kw) -> tuple[SlimRoutedModel, SlimRoutedModel]:
    """(bucketed, grouped) loads of one channel package with per-ticket BN statistics."""
    torch.manual_seed(0)
    r = rtl.wrap(make_model(), len(keeps), example_inputs=x1, granularity="channel", **wrap_kw)
    r.set_tickets(channel_tickets(r.space, keeps))
    r.train()
    with torch.no_grad():
        r(torch.randn(3 * len(keeps), *x1.shape[1:]), route=torch.arange(3 * len(keeps)) % len(keeps))
    r.eval()
    export_package(r, tmp_path / "pkg", example_inputs=torch.randn(2, *x1.shape[1:]))
    torch.manual_seed(1)
    return (load_package(tmp_path / "pkg", make_model(), execution="bucketed"),
            load_package(tmp_path / "pkg", make_model(), execution="grouped"))


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("keeps", [(0.5, 0.5, 0.5), (0.5, 0.75, 0.25)], ids=["equal", "unequal"])
def test_grouped_package_equals_per_ticket_tiny(tmp_path, keeps):
    bucketed, grouped = _package(tmp_path, lambda: TinyCNN(), torch.randn(1, 3, 8, 8), keeps, adapter="generic",
                                 output_layers=["head"])
    x = torch.randn(len(ROUTE), 3, 8, 8)
    with torch.no_grad():
        want = bucketed(x, route=ROUTE)
        got = grouped(x, route=ROUTE)
        assert _rel(got, want) < 1e-5
        assert grouped._stacked.blocker is None and grouped._stacked.verified
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            grouped(x, route=torch.tensor([0, 1, 2, 0, 1, 2, 2]))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in grouped.tickets[0].modules())
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::convolution") == n_convs
    shared = keeps[0] == keeps[1] == keeps[2]  # equal widths: the slim tensors are views of the stacks
    w0 = grouped.tickets[1].conv1.weight
    assert (w0.untyped_storage().data_ptr() == grouped._stacked.specs["conv1"]["weight"].untyped_storage().data_ptr()) \
        == shared


def test_grouped_package_residual_timm_unequal_widths(tmp_path):
    import timm
    bucketed, grouped = _package(tmp_path, lambda: timm.create_model("test_resnet", num_classes=4),
                                 torch.randn(1, 3, 32, 32), (0.5, 0.75, 0.25))
    x = torch.randn(len(ROUTE), 3, 32, 32)
    with torch.no_grad():
        assert _rel(grouped(x, route=ROUTE), bucketed(x, route=ROUTE)) < 1e-5
    assert grouped._stacked.blocker is None


def test_grouped_package_smp_unet_equal_widths_and_pixel_routes(tmp_path):
    import segmentation_models_pytorch as smp

    def make():
        return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=2)
    bucketed, grouped = _package(tmp_path, make, torch.randn(1, 3, 32, 32), (0.5, 0.5, 0.5))
    x = torch.randn(3, 3, 32, 32)
    pix = torch.randint(0, K, (3, 32, 32))
    with torch.no_grad():
        assert _rel(grouped(x, route=pix), bucketed(x, route=pix)) < 1e-5
        assert _rel(grouped(x, route=torch.tensor([2, 0, 2])), bucketed(x, route=torch.tensor([2, 0, 2]))) < 1e-5
    assert grouped._stacked.blocker is None


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def test_unsupported_layers_fall_back_or_raise(tmp_path):
    models = [_Normed(), _Normed(), _Normed()]
    slim = SlimRoutedModel(models)
    assert "GroupNorm" in slim._stacked_tickets().blocker
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = torch.cat([models[t](x[i:i + 1]) for i, t in enumerate([0, 2, 1, 0])])
        assert torch.allclose(slim(x, route=torch.tensor([0, 2, 1, 0])), want, atol=1e-6)  # auto: per ticket
    with pytest.raises(ExecutionError, match="GroupNorm.*bucketed"):
        slim.execution = "grouped"
    with pytest.raises(ExecutionError, match="execution must be one of"):
        SlimRoutedModel(models, execution="fast")


def test_stacks_follow_weight_edits_and_moves(tmp_path):
    bucketed, grouped = _package(tmp_path, lambda: TinyCNN(), torch.randn(1, 3, 8, 8), (0.5, 0.75, 0.25),
                                 adapter="generic", output_layers=["head"])
    x = torch.randn(len(ROUTE), 3, 8, 8)
    with torch.no_grad():
        grouped(x, route=ROUTE)
        for s in (bucketed, grouped):
            s.tickets[2].conv1.weight.mul_(2.0)  # padded layer: the stacks are stale and rebuilt
        assert _rel(grouped(x, route=ROUTE), bucketed(x, route=ROUTE)) < 1e-5
        grouped.double(), bucketed.double()
        assert grouped._stacked is None
        assert _rel(grouped(x.double(), route=ROUTE), bucketed(x.double(), route=ROUTE)) < 1e-9


def test_concatenation_of_unequal_widths_is_caught_on_the_first_batch(tmp_path):
    """U-Net skip concatenations: padding each part at its end misplaces the second part's channels when the
    tickets' widths differ; the first-batch check catches it: forced grouped raises, auto runs per ticket."""
    import segmentation_models_pytorch as smp

    def make():
        return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=2)
    bucketed, grouped = _package(tmp_path, make, torch.randn(1, 3, 32, 32), (0.5, 0.75, 0.25))
    x, route = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad(), pytest.raises(ExecutionError, match="concatenation.*bucketed"):
        grouped(x, route=route)
    grouped.execution = "auto"
    with torch.no_grad():
        assert _rel(grouped(x, route=route), bucketed(x, route=route)) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grouped_package_equals_per_ticket_and_auto_groups(tmp_path):
    import timm
    bucketed, grouped = _package(tmp_path, lambda: timm.create_model("test_resnet", num_classes=4),
                                 torch.randn(1, 3, 32, 32), (0.5, 0.75, 0.25))
    bucketed.cuda(), grouped.cuda()
    grouped.execution = "auto"
    x, route = torch.randn(len(ROUTE), 3, 32, 32, device="cuda"), ROUTE.cuda()
    with torch.no_grad():
        assert _rel(grouped(x, route=route), bucketed(x, route=route)) < 1e-4
    assert grouped.execution_on("cuda") == "grouped" and bucketed.execution_on("cuda") == "bucketed"
