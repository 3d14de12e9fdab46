"""Speech-enhancement U-Net on the complex STFT (the audio model of "Routing the Lottery").

16 kHz waveform -> STFT (n_fft=1024, hop=256, hann) -> real/imag channels ``[B, 2, T, F]``
(F = 513) -> :class:`ComplexMaskUNet` -> bounded complex ratio mask -> masked STFT -> iSTFT.

Only :class:`ComplexMaskUNet` (spectrogram in, mask out) is meant to be traced by
torch-pruning; the STFT/iSTFT wrapper :class:`AudioUNet` is plain signal processing around it.

``torchaudio`` (``pip install "rtl-plugin[audio]"``) and ``torchmetrics`` (only for
:func:`si_snr_improvement`) are imported lazily.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from rtl_plugin.errors import DataError, MissingDependencyError

__all__ = [
    "ComplexMaskUNet",
    "AudioUNet",
    "create_audio_unet",
    "apply_complex_mask",
    "weighted_sdr_loss",
    "si_snr_improvement",
]

_MASK_EPS = 1e-8
_LOSS_EPS = 1e-8
# Five stride-2 halvings of the frequency axis must stay exact: F = 32 * k + 1.
_F_MULTIPLE = 32


def _missing(what: str, fix: str) -> MissingDependencyError:
    return MissingDependencyError(f"{what}, which is not installed; fix with:\n{fix}")


def _enc_block(c_in: int, c_out: int, kernel: tuple[int, int], padding: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, kernel, stride=(1, 2), padding=padding, bias=False),
            bn=nn.BatchNorm2d(c_out),
            act=nn.ELU(),
        )
    )


def _dec_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.ConvTranspose2d(c_in, c_out, (3, 3), stride=(1, 2), padding=(1, 1), bias=False),
            bn=nn.BatchNorm2d(c_out),
            act=nn.ELU(),
        )
    )


class ComplexMaskUNet(nn.Module):
    """Small U-Net mapping a real/imag spectrogram ``[B, 2, T, F]`` to a raw mask ``[B, 2, T, F]``.

    The frequency axis is halved five times (513 -> 257 -> 129 -> 65 -> 33 -> 17) and
    restored exactly by the transposed convolutions, so no cropping is needed for any
    ``F = 32 * k + 1``; the time axis is preserved throughout. ``dec5`` is the output
    convolution (no BN / activation); the mask bounding happens in :func:`apply_complex_mask`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = _enc_block(2, 12, (3, 5), (1, 2))
        self.enc2 = _enc_block(12, 12, (3, 3), (1, 1))
        self.enc3 = _enc_block(12, 12, (3, 3), (1, 1))
        self.enc4 = _enc_block(12, 24, (3, 3), (1, 1))
        self.enc5 = _enc_block(24, 48, (3, 3), (1, 1))
        self.dec1 = _dec_block(48, 24)  # e5 -> ~e4
        self.dec2 = _dec_block(48, 12)  # cat(d1, e4) -> ~e3
        self.dec3 = _dec_block(24, 12)  # cat(d2, e3) -> ~e2
        self.dec4 = _dec_block(24, 12)  # cat(d3, e2) -> ~e1
        self.dec5 = nn.ConvTranspose2d(24, 2, (3, 5), stride=(1, 2), padding=(1, 2))  # cat(d4, e1) -> mask

    def output_layer_names(self) -> list[str]:
        """Dotted names (relative to this module) of the output convolution."""
        return ["dec5"]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 2 or (x.shape[-1] - 1) % _F_MULTIPLE != 0:
            raise DataError(
                "ComplexMaskUNet expects a spectrogram of shape [B, 2, T, F] with F = 32*k + 1 "
                f"(e.g. F=513 for n_fft=1024), got {tuple(x.shape)}"
            )
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        e5 = self.enc5(e4)
        d1 = self.dec1(e5)
        d2 = self.dec2(torch.cat([d1, e4], dim=1))
        d3 = self.dec3(torch.cat([d2, e3], dim=1))
        d4 = self.dec4(torch.cat([d3, e2], dim=1))
        return self.dec5(torch.cat([d4, e1], dim=1))


def apply_complex_mask(mask: Tensor, spec: Tensor) -> Tensor:
    """Bound the raw mask's magnitude with tanh and multiply it (complex) into ``spec``.

    Both tensors are real/imag channel layouts ``[B, 2, T, F]``; returns the same layout.
    ``M = tanh(|m|) * m / |m|`` with ``|m|`` guarded by eps, so ``m = 0`` gives ``M = 0``
    with finite gradients.
    """
    mr, mi = mask[:, 0], mask[:, 1]
    mod = torch.sqrt(mr * mr + mi * mi + _MASK_EPS**2)
    scale = torch.tanh(mod) / mod
    mr, mi = mr * scale, mi * scale
    xr, xi = spec[:, 0], spec[:, 1]
    return torch.stack([mr * xr - mi * xi, mr * xi + mi * xr], dim=1)


class AudioUNet(nn.Module):
    """Waveform ``[B, L]`` -> enhanced waveform ``[B, L]`` via :class:`ComplexMaskUNet` on the STFT."""

    def __init__(self, *, n_fft: int = 1024, hop_length: int = 256, sample_rate: int = 16000) -> None:
        super().__init__()
        try:
            import torchaudio  # noqa: F401  (lazy: optional dependency)
            from torchaudio.transforms import InverseSpectrogram, Spectrogram
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing("the audio model needs torchaudio", 'pip install "rtl-plugin[audio]"') from exc
        n_fft, hop_length, sample_rate = int(n_fft), int(hop_length), int(sample_rate)
        if n_fft <= 0 or (n_fft // 2) % _F_MULTIPLE != 0 or n_fft % 2 != 0:
            raise DataError(
                f"n_fft must be a positive multiple of {2 * _F_MULTIPLE} so that the "
                f"n_fft // 2 + 1 frequency bins halve exactly five times, got n_fft={n_fft}"
            )
        if hop_length <= 0 or hop_length > n_fft:
            raise DataError(f"hop_length must be in [1, n_fft={n_fft}], got {hop_length}")
        if sample_rate <= 0:
            raise DataError(f"sample_rate must be positive, got {sample_rate}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.sample_rate = sample_rate
        self.n_freq = n_fft // 2 + 1
        self.stft = Spectrogram(n_fft=n_fft, hop_length=hop_length, window_fn=torch.hann_window, power=None)
        self.istft = InverseSpectrogram(n_fft=n_fft, hop_length=hop_length, window_fn=torch.hann_window)
        self.unet = ComplexMaskUNet()

    def output_layer_names(self) -> list[str]:
        """Full dotted names of the output convolution, e.g. ``["unet.dec5"]``."""
        return [f"unet.{name}" for name in self.unet.output_layer_names()]

    def _check_wave(self, wave: Tensor) -> Tensor:
        if not isinstance(wave, Tensor):
            raise DataError(f"expected a float waveform tensor of shape [B, L] or [L], got {type(wave).__name__}")
        if not wave.is_floating_point():
            raise DataError(f"expected a float waveform tensor of shape [B, L] or [L], got dtype {wave.dtype}")
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2:
            raise DataError(f"expected a waveform of shape [B, L] or [L], got shape {tuple(wave.shape)}")
        if wave.shape[0] < 1 or wave.shape[1] < self.n_fft:
            raise DataError(
                f"expected a waveform of shape [B, L] with B >= 1 and L >= n_fft={self.n_fft} samples, "
                f"got shape {tuple(wave.shape)}"
            )
        return wave

    def spectrogram(self, wave: Tensor) -> Tensor:
        """STFT of ``wave`` ``[B, L]`` (or ``[L]``) as real/imag channels ``[B, 2, T, F]``."""
        wave = self._check_wave(wave)
        spec = self.stft(wave)  # complex [B, F, T]
        return torch.view_as_real(spec).permute(0, 3, 2, 1).contiguous()

    def inverse_spectrogram(self, spec: Tensor, length: int) -> Tensor:
        """Inverse of :meth:`spectrogram`: ``[B, 2, T, F]`` -> waveform ``[B, length]``."""
        if spec.dim() != 4 or spec.shape[1] != 2:
            raise DataError(f"expected a spectrogram of shape [B, 2, T, F], got {tuple(spec.shape)}")
        complex_spec = torch.complex(spec[:, 0], spec[:, 1]).transpose(1, 2)  # [B, F, T]
        return self.istft(complex_spec, length=int(length))

    def forward(self, wave: Tensor) -> Tensor:
        wave = self._check_wave(wave)
        spec = self.spectrogram(wave)
        mask = self.unet(spec)
        enhanced = apply_complex_mask(mask, spec)
        return self.inverse_spectrogram(enhanced, length=wave.shape[-1])


def create_audio_unet(**kw) -> AudioUNet:
    """Build an :class:`AudioUNet` (keyword arguments forwarded)."""
    return AudioUNet(**kw)


def _check_triplet(noisy: Tensor, enhanced: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    out = []
    for name, t in (("noisy", noisy), ("enhanced", enhanced), ("clean", clean)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise DataError(f"{name} must be a float tensor of shape [B, L] or [L]")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise DataError(f"{name} must have shape [B, L] or [L], got {tuple(t.shape)}")
        out.append(t)
    if not (out[0].shape == out[1].shape == out[2].shape):
        raise DataError(
            "noisy, enhanced and clean must share the shape [B, L], got "
            f"{tuple(out[0].shape)}, {tuple(out[1].shape)}, {tuple(out[2].shape)}"
        )
    return out[0], out[1], out[2]


def _neg_cosine(target: Tensor, estimate: Tensor) -> Tensor:
    num = (target * estimate).sum(dim=-1)
    den = target.norm(dim=-1) * estimate.norm(dim=-1) + _LOSS_EPS
    return -num / den


def weighted_sdr_loss(noisy: Tensor, enhanced: Tensor, clean: Tensor) -> Tensor:
    """Weighted SDR loss of Choi et al. (2019), mean over the batch, in [-1, 1].

    ``alpha * -cos(clean, enhanced) + (1 - alpha) * -cos(noise, noisy - enhanced)`` with
    ``noise = noisy - clean`` and ``alpha = |clean|^2 / (|clean|^2 + |noise|^2)``.
    A perfect estimate gives -1.
    """
    noisy, enhanced, clean = _check_triplet(noisy, enhanced, clean)
    noise = noisy - clean
    noise_est = noisy - enhanced
    clean_e = clean.pow(2).sum(dim=-1)
    noise_e = noise.pow(2).sum(dim=-1)
    alpha = clean_e / (clean_e + noise_e + _LOSS_EPS)
    loss = alpha * _neg_cosine(clean, enhanced) + (1.0 - alpha) * _neg_cosine(noise, noise_est)
    return loss.mean()


def si_snr_improvement(noisy: Tensor, enhanced: Tensor, clean: Tensor) -> Tensor:
    """Per-sample SI-SNR improvement in dB, ``SI-SNR(enhanced, clean) - SI-SNR(noisy, clean)``, shape [B]."""
    try:
        from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise _missing("si_snr_improvement needs torchmetrics", "pip install torchmetrics") from exc
    noisy, enhanced, clean = _check_triplet(noisy, enhanced, clean)
    return scale_invariant_signal_noise_ratio(enhanced, clean) - scale_invariant_signal_noise_ratio(noisy, clean)


# --------------------------------------------------------------------------- rtl-plugin adapter
from rtl_plugin.adapters import Adapter, register_adapter  # noqa: E402


@register_adapter("audio")
class AudioUNetAdapter(Adapter):
    """Audio U-Net: traces the spectrogram U-Net behind the STFT; the last transposed conv is the output."""
    priority = 30

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, (AudioUNet, ComplexMaskUNet))

    def output_layers(self, model: nn.Module) -> list[str]:
        return model.output_layer_names()

    def example_inputs(self, model: nn.Module) -> Tensor:
        if isinstance(model, AudioUNet):
            return torch.randn(1, model.n_fft * 2)
        return torch.randn(1, 2, 8, 513)

    def trace_root(self, model: nn.Module) -> str:
        return "unet" if isinstance(model, AudioUNet) else ""

    def trace_inputs(self, model: nn.Module, example_inputs):
        if isinstance(model, AudioUNet):
            with torch.no_grad():
                return model.spectrogram(example_inputs)
        return example_inputs
