"""Per model family: routed tickets equal their exported subnetworks, mixed-route batches equal each
route run alone, and gradients stay inside each sample's ticket.

One shared base class, one tiny subclass per family (the segmentation_models_pytorch test style).
"""
from __future__ import annotations

import abc

import pytest
import torch

import rtl_plugin as rtl

K = 3
ROUTE = [0, 1, 2, 1, 0, 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class FamilyBase(abc.ABC):
    """Subclasses implement ``make_model`` / ``make_input`` (dense predictors subclass DenseFamilyBase)."""
    tol = 1e-5
    device = "cpu"  # tests/integrations/test_cuda.py reruns some families on "cuda"

    @abc.abstractmethod
    def make_model(self) -> torch.nn.Module:
        """A fresh model of the family."""

    @abc.abstractmethod
    def make_input(self, b: int) -> torch.Tensor:
        """A batch of ``b`` inputs."""

    # ---------------------------------------------------------------- helpers
    def inp(self, b: int) -> torch.Tensor:
        return self.make_input(b).to(self.device)

    def routed(self, granularity: str, seed: int = 0) -> rtl.RoutedModel:
        torch.manual_seed(seed)
        r = rtl.wrap(self.make_model().to(self.device), K, granularity=granularity)
        r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.6, seed=seed + 1))
        # give every ticket its own norm statistics so ticket-specific stats matter
        r.train()
        with torch.no_grad():
            x = self.inp(len(ROUTE))
            r(x, route=torch.tensor(ROUTE, device=self.device))
        return r

    # ---------------------------------------------------------------- tests
    @pytest.mark.parametrize("granularity", ["weight", "channel"])
    def test_export_equals_routed(self, granularity):
        r = self.routed(granularity).eval()
        x = self.inp(2)
        with torch.no_grad():
            for k in range(K):
                slim = rtl.export_ticket(r, k).eval()
                y_routed = r(x, route=k)
                y_slim = slim(x)
                assert y_slim.shape == y_routed.shape
                assert _rel(y_slim, y_routed) < self.tol, (granularity, k, _rel(y_slim, y_routed))
                if granularity == "channel":
                    n_full = sum(p.numel() for p in r.model.parameters())
                    assert sum(p.numel() for p in slim.parameters()) < n_full

    @pytest.mark.parametrize("granularity", ["weight", "channel"])
    @pytest.mark.parametrize("train", [False, True])
    def test_mixed_batch_equals_each_route_alone(self, granularity, train):
        r = self.routed(granularity)
        r.train(train)
        x = self.inp(len(ROUTE))
        if train:
            # train-mode BN over 2 samples at 1x1 or 2x2 resolution amplifies float32 summation-order noise
            # (a 6-sample conv vs a 2-sample conv); float64 keeps the check sharp.
            r.double()
            x = x.double()
        route = torch.tensor(ROUTE, device=self.device)
        with torch.no_grad():
            y = r(x, route=route)
            for k in range(K):
                idx = (route == k).nonzero().flatten()
                y_alone = r(x[idx], route=k)
                assert _rel(y[idx], y_alone) < self.tol, (granularity, train, k)

    @pytest.mark.parametrize("granularity", ["weight", "channel"])
    def test_gradients_stay_in_ticket(self, granularity):
        r = self.routed(granularity).eval()
        k = 1
        x = self.inp(2)
        r.zero_grad()
        y = r(x, route=torch.full((2,), k, device=self.device))
        y.float().pow(2).mean().backward()
        masks = r.tickets.element_masks()
        some_grad = False
        for name in r.space.layers:
            g = r.model.get_submodule(name).weight.grad
            if g is None:
                continue
            outside = g[~masks[name][k]]
            assert outside.abs().max().item() == 0.0 if outside.numel() else True, name
            some_grad = some_grad or bool(g[masks[name][k]].abs().sum() > 0)
        assert some_grad



class DenseFamilyBase(FamilyBase):
    """Dense-prediction families additionally route per pixel."""

    def test_pixel_routes(self):
        for gran in ("weight", "channel"):
            r = self.routed(gran).eval()
            x = self.inp(2)
            with torch.no_grad():
                full = [r(x, route=k) for k in range(K)]
                H, W = full[0].shape[-2:]
                route = torch.zeros(2, H, W, dtype=torch.long, device=self.device)
                route[:, : H // 2] = 1
                route[1, :, : W // 3] = 2
                y = r(x, route=route)
                expect = torch.zeros_like(y)
                for k in range(K):
                    sel = (route == k).unsqueeze(1).expand_as(y)
                    expect[sel] = full[k][sel]
                assert _rel(y, expect) < self.tol


class TestTimmResnet18(FamilyBase):
    def make_model(self):
        import timm
        return timm.create_model("resnet18", num_classes=5)

    def make_input(self, b):
        return torch.randn(b, 3, 32, 32)


class TestTimmEfficientNetB0(FamilyBase):
    def make_model(self):
        import timm
        return timm.create_model("efficientnet_b0", num_classes=5)

    def make_input(self, b):
        return torch.randn(b, 3, 32, 32)


class TestTimmConvNextAtto(FamilyBase):
    tol = 1e-4  # mask-aware LayerNorm sums in another order than a physically pruned one

    def make_model(self):
        import timm
        return timm.create_model("convnext_atto", num_classes=5)

    def make_input(self, b):
        return torch.randn(b, 3, 32, 32)


class TestTimmRegNetY002(FamilyBase):
    def make_model(self):
        import timm
        return timm.create_model("regnety_002", num_classes=5)

    def make_input(self, b):
        return torch.randn(b, 3, 32, 32)


class TestTimmMobileNetV3Small(FamilyBase):
    def make_model(self):
        import timm
        return timm.create_model("mobilenetv3_small_100", num_classes=5)

    def make_input(self, b):
        return torch.randn(b, 3, 32, 32)


class TestSmpUnetResnet18(DenseFamilyBase):

    def make_model(self):
        import segmentation_models_pytorch as smp
        return smp.Unet("resnet18", encoder_weights=None, classes=4)

    def make_input(self, b):
        return torch.randn(b, 3, 64, 64)


class TestSmpUnetEfficientNetLite0(DenseFamilyBase):

    def make_model(self):
        import segmentation_models_pytorch as smp
        return smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=4)

    def make_input(self, b):
        return torch.randn(b, 3, 64, 64)


class TestAudioUNet(FamilyBase):
    def make_model(self):
        from rtl_plugin.integrations.audio import AudioUNet
        return AudioUNet()

    def make_input(self, b):
        return torch.randn(b, 4096)


def test_smp_frozen_encoder_keeps_full_space():
    import segmentation_models_pytorch as smp
    m1 = smp.Unet("resnet18", encoder_weights=None, classes=2)
    m2 = smp.Unet("resnet18", encoder_weights=None, classes=2)
    m2.encoder.requires_grad_(False)
    s1 = rtl.wrap(m1, 2).space
    s2 = rtl.wrap(m2, 2).space
    assert s1.layers == s2.layers
    assert not any(p.requires_grad for p in m2.encoder.parameters())  # flags restored


def test_smp_scse_attention_rejected_in_channel_mode():
    import segmentation_models_pytorch as smp
    m = smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_attention_type="scse")
    with pytest.raises(rtl.UnsupportedLayerError, match="attention|broadcast"):
        rtl.wrap(m, 2, granularity="channel")
    # weight granularity works with the same model
    r = rtl.wrap(smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_attention_type="scse"), 2)
    with torch.no_grad():
        assert r.eval()(torch.randn(1, 3, 64, 64), route=1).shape == (1, 2, 64, 64)


def test_adapters_detected():
    import segmentation_models_pytorch as smp
    import timm

    from rtl_plugin.integrations.audio import AudioUNet
    assert rtl.detect_adapter(timm.create_model("resnet18", num_classes=3)).name == "timm"
    assert rtl.detect_adapter(smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None)).name == "smp"
    assert rtl.detect_adapter(AudioUNet()).name == "audio"
    assert rtl.detect_adapter(torch.nn.Sequential(torch.nn.Linear(3, 3))).name == "generic"
    assert {"timm", "smp", "audio", "generic"} <= set(rtl.list_adapters())


def test_output_layers_not_pruned():
    import segmentation_models_pytorch as smp
    import timm

    from rtl_plugin.integrations.audio import AudioUNet
    assert "fc" not in rtl.wrap(timm.create_model("resnet18", num_classes=3), 2).space.layers
    sp = rtl.wrap(smp.Unet("resnet18", encoder_weights=None, classes=2), 2).space
    assert not any(n.startswith("segmentation_head") for n in sp.layers)
    sp = rtl.wrap(AudioUNet(), 2).space
    assert "unet.dec5" not in sp.layers and "unet.enc1.conv" in sp.layers
