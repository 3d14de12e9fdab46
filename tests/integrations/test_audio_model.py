"""Tests of the speech-enhancement U-Net (rtl_plugin.integrations.audio)."""

import pytest
import torch
from torch import nn

import torchaudio  # noqa: F401  ([test] extra: a missing one fails)

from rtl_plugin.errors import DataError  # noqa: E402
from rtl_plugin.integrations.audio import (  # noqa: E402
    AudioUNet,
    ComplexMaskUNet,
    apply_complex_mask,
    create_audio_unet,
    si_snr_improvement,
    weighted_sdr_loss,
)

EXPECTED_CONV_WEIGHTS = 37_368


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _conv_weight_count(module: nn.Module) -> int:
    return sum(
        m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    )


# ----------------------------------------------------------------------------- shapes / size


def test_unet_shapes_and_skip_sizes():
    unet = ComplexMaskUNet().eval()
    x = torch.randn(2, 2, 8, 513)
    sizes = []
    h = x
    for name in ["enc1", "enc2", "enc3", "enc4", "enc5"]:
        h = getattr(unet, name)(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(12, 8, 257), (12, 8, 129), (12, 8, 65), (24, 8, 33), (48, 8, 17)]
    with torch.no_grad():
        assert unet(x).shape == (2, 2, 8, 513)


def test_audio_unet_forward_shapes():
    model = create_audio_unet()
    assert isinstance(model, AudioUNet)
    wave = torch.randn(2, 8000)
    spec = model.spectrogram(wave)
    assert spec.shape == (2, 2, 8000 // 256 + 1, 513)
    out = model(wave)
    assert out.shape == (2, 8000)
    assert torch.isfinite(out).all()
    # 1-D input is promoted to [1, L]
    assert model(torch.randn(5000)).shape == (1, 5000)


def test_output_layer_names_resolve_to_last_conv():
    model = create_audio_unet()
    names = model.output_layer_names()
    assert names == ["unet.dec5"]
    layer = model.get_submodule(names[0])
    assert isinstance(layer, nn.ConvTranspose2d) and layer.out_channels == 2
    assert model.unet.get_submodule(model.unet.output_layer_names()[0]) is layer


def test_conv_weight_count():
    model = create_audio_unet()
    count = _conv_weight_count(model)
    assert 36_000 < count < 38_500
    assert count == EXPECTED_CONV_WEIGHTS


def test_backward_gives_finite_grads():
    model = create_audio_unet()
    clean = torch.randn(2, 4096)
    noisy = clean + 0.5 * torch.randn(2, 4096)
    loss = weighted_sdr_loss(noisy, model(noisy), clean)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- STFT / mask


def test_stft_round_trip():
    model = create_audio_unet()
    wave = torch.randn(3, 12345)
    rec = model.inverse_spectrogram(model.spectrogram(wave), length=wave.shape[-1])
    assert rec.shape == wave.shape
    assert torch.allclose(rec, wave, atol=1e-4)


def test_mask_is_bounded_and_zero_safe():
    spec = torch.randn(1, 2, 4, 513)
    big = torch.full((1, 2, 4, 513), 100.0)
    out = apply_complex_mask(big, spec)
    ratio = torch.linalg.vector_norm(out, dim=1) / torch.linalg.vector_norm(spec, dim=1)
    assert (ratio <= 1.0 + 1e-5).all()
    zero = torch.zeros(1, 2, 4, 513, requires_grad=True)
    out0 = apply_complex_mask(zero, spec)
    assert torch.equal(out0, torch.zeros_like(out0))
    out0.sum().backward()
    assert torch.isfinite(zero.grad).all()


# ----------------------------------------------------------------------------- losses / metrics


def test_weighted_sdr_loss_range_and_perfect():
    clean = torch.randn(4, 4000)
    noisy = clean + 0.3 * torch.randn(4, 4000)
    perfect = weighted_sdr_loss(noisy, clean.clone(), clean)
    assert perfect.dim() == 0
    assert perfect.item() == pytest.approx(-1.0, abs=1e-4)
    for enhanced in (torch.randn(4, 4000), noisy, -clean, torch.zeros(4, 4000)):
        val = weighted_sdr_loss(noisy, enhanced, clean).item()
        assert -1.0 - 1e-6 <= val <= 1.0 + 1e-6
    # 1-D inputs are accepted
    assert weighted_sdr_loss(noisy[0], clean[0], clean[0]).item() == pytest.approx(-1.0, abs=1e-4)


def test_si_snr_improvement():
    clean = torch.randn(3, 4000)
    noisy = clean + 0.5 * torch.randn(3, 4000)
    zero = si_snr_improvement(noisy, noisy, clean)
    assert zero.shape == (3,)
    assert torch.allclose(zero, torch.zeros(3), atol=1e-4)
    better = si_snr_improvement(noisy, clean + 0.05 * torch.randn(3, 4000), clean)
    assert (better > 0).all()


def test_metric_shape_mismatch_raises():
    with pytest.raises(DataError):
        weighted_sdr_loss(torch.randn(2, 100), torch.randn(2, 99), torch.randn(2, 100))
    with pytest.raises(DataError):
        si_snr_improvement(torch.randn(2, 100), torch.randn(3, 100), torch.randn(2, 100))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(1, 1000),  # shorter than n_fft
        torch.randn(2, 1, 4096),  # 3-D
        torch.ones(1, 4096, dtype=torch.long),  # not float
        torch.randn(0, 4096),  # empty batch
    ],
)
def test_forward_validation(bad):
    model = create_audio_unet()
    with pytest.raises(DataError, match=r"\[B, L\]"):
        model(bad)
    assert issubclass(DataError, ValueError)


def test_unet_input_validation_and_config():
    unet = ComplexMaskUNet()
    with pytest.raises(DataError):
        unet(torch.randn(1, 2, 8, 500))
    with pytest.raises(DataError):
        unet(torch.randn(1, 3, 8, 513))
    with pytest.raises(DataError):
        AudioUNet(n_fft=1000)
    small = AudioUNet(n_fft=512, hop_length=128)
    assert small(torch.randn(1, 2048)).shape == (1, 2048)


# ----------------------------------------------------------------------------- torch-pruning


def test_torch_pruning_traces_and_prunes():
    import torch_pruning as tp
    unet = ComplexMaskUNet().eval()
    example = torch.randn(1, 2, 8, 513)
    DG = tp.DependencyGraph().build_dependency(unet, example_inputs=example)
    groups = list(DG.get_all_groups(ignored_layers=[unet.dec5]))
    roots = {g[0].dep.target.module for g in groups}
    # one group per hidden conv: enc1..enc5 and dec1..dec4, the output conv is ignored
    expected = {getattr(unet, f"enc{i}").conv for i in range(1, 6)} | {
        getattr(unet, f"dec{i}").conv for i in range(1, 5)
    }
    assert roots == expected

    # enc4 feeds both enc5 and (through the skip concat) dec2: the group must reach both
    group = DG.get_pruning_group(unet.enc4.conv, tp.prune_conv_out_channels, idxs=[0, 5, 7])
    touched = {dep.target.module for dep, _ in group}
    assert unet.enc5.conv in touched and unet.dec2.conv in touched
    group.prune()
    assert unet.enc4.conv.out_channels == 21
    assert unet.enc5.conv.in_channels == 21
    assert unet.dec2.conv.in_channels == 45
    with torch.no_grad():
        assert unet(example).shape == (1, 2, 8, 513)

    # a group from get_all_groups pruned via group.prune(idxs=...)
    DG = tp.DependencyGraph().build_dependency(unet, example_inputs=example)
    g = next(g for g in DG.get_all_groups(ignored_layers=[unet.dec5]) if g[0].dep.target.module is unet.dec3.conv)
    g.prune(idxs=[1, 2])
    assert unet.dec3.conv.out_channels == 10 and unet.dec4.conv.in_channels == 22
    with torch.no_grad():
        assert unet(example).shape == (1, 2, 8, 513)
    assert _conv_weight_count(unet) < EXPECTED_CONV_WEIGHTS
