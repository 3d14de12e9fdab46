"""Offline noisy-speech data for the speech-enhancement experiment (one ticket per acoustic environment).

Clean speech is synthesised with ``espeak-ng`` (several voices, variants, speeds and pitches, many short
generated sentences) and, when installed, ``flite`` (16 kHz voices); noise comes from three environments
(``indoor``, ``outdoor``, ``transport``), each built from several synthetic sources (numpy signal models
filtered and shaped with ``sox`` effects; babble from mixed speech of other voices) and, when the Debian
package ``sonic-pi-samples`` is installed, real recorded CC0 clips (room hums, vinyl hiss, wind, crow,
3D printer, industrial loops; :data:`REAL_NOISE_CLIPS`). Every environment's sources are split into
train and test sources, so test noise is unseen.

A held-out **real-speech** test split (``SpeechData.real``) mixes recorded speech (asterisk prompts, codec2
and pocketsphinx test clips, 8 or 16 kHz, resampled to 16 kHz; :func:`real_speech_files`) with the TEST
noise sources of each environment; it is never used for training. Clips are mixed at SNRs drawn
uniformly from a range (default -5 to 10 dB). Everything is deterministic in the seed and cached on disk
(``.npz``, no pickle, atomic writes) under ``$RTL_CACHE`` (default ``~/.cache/rtl-plugin``).

Needs the Debian packages ``espeak-ng`` and ``sox`` (``apt-get install espeak-ng sox``; ``flite`` optional);
real noise and the real-speech split need :data:`REAL_INSTALL_LINE` (skipped with a warning when absent,
MissingDependencyError with ``require_real=True``).
Waveforms are float32 at 16 kHz; shapes ``[N, L]`` with ``L = clip_seconds * 16000`` samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import warnings
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rtl_plugin.errors import CorruptFileError, DataError, MissingDependencyError
from rtl_plugin.persist.io import atomic_write_npz, default_cache_dir

SAMPLE_RATE = 16000
FORMAT_VERSION = 2  # 2: real noise clips (sonic-pi-samples) + held-out real-speech test split
ENVIRONMENTS = ("indoor", "outdoor", "transport")
INSTALL_LINE = "apt-get install espeak-ng sox"
REAL_INSTALL_LINE = ("apt-get install sox libsox-fmt-all sonic-pi-samples asterisk-core-sounds-en-wav "
                     "codec2-examples pocketsphinx-testdata")

# ---------------------------------------------------------------------------- sources: speech
_WORDS = {
    "det": ["the", "a", "my", "your", "this", "that", "every", "one"],
    "adj": ["small", "green", "quiet", "heavy", "bright", "old", "cold", "happy", "yellow", "broken", "tall",
            "sharp", "warm", "empty", "careful", "strange"],
    "noun": ["dog", "river", "window", "teacher", "garden", "engine", "letter", "doctor", "kitchen", "island",
             "pencil", "market", "mountain", "bottle", "station", "painter", "ticket", "forest", "camera", "bridge"],
    "verb": ["found", "opened", "carried", "watched", "painted", "followed", "moved", "cleaned", "reached",
             "counted", "visited", "repaired", "pushed", "noticed"],
    "adv": ["slowly", "today", "again", "quickly", "at noon", "last night", "on monday", "very early", "twice"],
}
#: (voice, variant) pairs used for target speech, and disjoint ones for babble noise
_ESPEAK_TARGET = [("en-us", "m1"), ("en-us", "f2"), ("en-gb", "m3"), ("en-gb", "f4"), ("en-gb-x-rp", "m2"),
                  ("en-us", "f1"), ("en-gb-scotland", "m4"), ("en-us", "klatt2")]
_ESPEAK_BABBLE_TRAIN = [("en-gb-x-gbclan", "m5"), ("en-us", "f3"), ("en-gb", "m6"), ("de", "m7")]
_ESPEAK_BABBLE_TEST = [("en-gb-x-rp", "f5"), ("en-us", "m2"), ("fr", "f2"), ("en-gb-scotland", "klatt")]
_FLITE_VOICES = ("slt", "rms", "awb", "kal16")


def _sentence(rng: np.random.Generator) -> str:
    w = {k: v[int(rng.integers(len(v)))] for k, v in _WORDS.items()}
    obj = _WORDS["noun"][int(rng.integers(len(_WORDS["noun"])))]
    return f"{w['det']} {w['adj']} {w['noun']} {w['verb']} the {obj} {w['adv']}"


def check_tools(require_flite: bool = False) -> dict[str, str | None]:
    """Paths of ``espeak-ng``, ``sox`` (required) and ``flite`` (optional); MissingDependencyError if absent."""
    found = {name: shutil.which(name) for name in ("espeak-ng", "sox", "flite")}
    missing = [n for n in ("espeak-ng", "sox") if found[n] is None]
    if require_flite and found["flite"] is None:
        missing.append("flite")
    if missing:
        raise MissingDependencyError(
            f"the noisy-speech dataset needs the system program(s) {', '.join(missing)}, not found on PATH; "
            f"install them with:\n{INSTALL_LINE}" + (" flite" if "flite" in missing else ""))
    return found


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM wav bytes -> float32 mono [L] in [-1, 1], sample rate."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise DataError(f"a speech synthesiser returned unreadable audio ({e}); check the espeak-ng/flite install") from e
    if width != 2:
        raise DataError(f"expected 16-bit PCM from the synthesiser, got {8 * width}-bit")
    # espeak-ng --stdout leaves the size fields unset: trust the bytes, not the header count
    x = np.frombuffer(raw[: len(raw) // (2 * ch) * 2 * ch], dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, ch).mean(1), sr


def _resample(x: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE:
        return x.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly
    g = gcd(SAMPLE_RATE, sr)
    return resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)


def _espeak(text: str, voice: str, variant: str, speed: int, pitch: int, exe: str) -> np.ndarray:
    out = subprocess.run([exe, "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=False, timeout=60)
    if out.returncode != 0 or len(out.stdout) < 100:
        raise DataError(f"espeak-ng failed for voice {voice}+{variant}: {out.stderr.decode(errors='replace')[:200]}")
    x, sr = _read_wav(out.stdout)
    return _resample(x, sr)


def _flite(text: str, voice: str, exe: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "u.wav"
        out = subprocess.run([exe, "-voice", voice, "-t", text, "-o", str(path)], capture_output=True, timeout=60)
        if out.returncode != 0 or not path.exists():
            raise DataError(f"flite failed for voice {voice}: {out.stderr.decode(errors='replace')[:200]}")
        x, sr = _read_wav(path.read_bytes())
    return _resample(x, sr)


def _utterance_specs(n: int, rng: np.random.Generator, voices, flite_ok: bool) -> list[tuple]:
    specs = []
    for i in range(n):
        text = _sentence(rng)
        if flite_ok and voices is _ESPEAK_TARGET and i % 4 == 3:
            specs.append(("flite", text, _FLITE_VOICES[int(rng.integers(len(_FLITE_VOICES)))]))
        else:
            voice, variant = voices[int(rng.integers(len(voices)))]
            specs.append(("espeak", text, voice, variant, int(rng.integers(120, 200)), int(rng.integers(25, 75))))
    return specs


def _synthesise(specs: list[tuple], tools: dict, workers: int = 2) -> list[np.ndarray]:
    def one(spec):
        if spec[0] == "flite":
            return _flite(spec[1], spec[2], tools["flite"])
        return _espeak(spec[1], spec[2], spec[3], spec[4], spec[5], tools["espeak-ng"])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, specs))


def _speech_crop(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """An ``n``-sample window of utterance ``x`` with speech in it (energy >= 30% of the best window)."""
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    hop = SAMPLE_RATE // 20
    starts = np.arange(0, len(x) - n + 1, hop)
    if len(starts) == 0:
        starts = np.array([0])
    c = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    e = c[starts + n] - c[starts]
    good = starts[e >= 0.3 * e.max()]
    s = int(good[int(rng.integers(len(good)))])
    return x[s:s + n].astype(np.float32)


# ---------------------------------------------------------------------------- sources: noise
def _sox(x: np.ndarray, effects: list[str], exe: str) -> np.ndarray:
    """Run float32 [L] through ``sox`` effects (raw 32-bit float pipes, 16 kHz mono)."""
    fmt = ["-t", "raw", "-r", str(SAMPLE_RATE), "-e", "floating-point", "-b", "32", "-c", "1"]
    out = subprocess.run([exe, "-q", "-V1", *fmt, "-", *fmt, "-", *effects], input=x.astype("<f4").tobytes(),
                         capture_output=True, timeout=120)
    if out.returncode != 0:
        raise DataError(f"sox failed on effects {effects}: {out.stderr.decode(errors='replace')[:200]}")
    y = np.frombuffer(out.stdout, dtype="<f4").astype(np.float32)
    return y[: len(x)] if len(y) >= len(x) else np.pad(y, (0, len(x) - len(y)))


def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / SAMPLE_RATE


def _harmonics(n, rng, f0, count, decay, jitter=0.0):
    f = f0 * (1 + jitter * np.cumsum(rng.standard_normal(n)) / np.sqrt(n))  # slow frequency wander
    phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
    return sum(decay ** h * np.sin(h * phase + rng.uniform(0, 2 * np.pi)) for h in range(1, count + 1))


def _envelope(n, rng, rate_hz, depth):
    """Smooth random gain in [1 - depth, 1 + depth]: gusts / load changes at about ``rate_hz``."""
    k = max(int(n / SAMPLE_RATE * rate_hz) + 3, 4)
    pts = rng.uniform(-1, 1, k)
    env = np.interp(np.linspace(0, k - 1, n), np.arange(k), pts)
    return 1 + depth * env


def _chirps(n, rng, f_lo, f_hi, per_s, dur):
    out = np.zeros(n)
    for _ in range(max(1, int(per_s * n / SAMPLE_RATE))):
        m = int(dur * SAMPLE_RATE * rng.uniform(0.5, 1.5))
        s = int(rng.integers(0, max(1, n - m)))
        f = np.linspace(rng.uniform(f_lo, f_hi), rng.uniform(f_lo, f_hi), m)
        tone = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * np.hanning(m)
        out[s:s + m] += tone[: n - s]
    return out


def _clicks(n, rng, period_s, jitter, band, exe):
    imp = np.zeros(n)
    t = rng.uniform(0, period_s)
    while t * SAMPLE_RATE < n:
        imp[int(t * SAMPLE_RATE)] = rng.uniform(0.5, 1.0) * rng.choice([-1, 1])
        t += period_s * (1 + jitter * rng.uniform(-1, 1))
    ring = np.exp(-np.arange(400) / 60.0) * rng.standard_normal(400)  # short metallic ring
    return _sox(np.convolve(imp, ring)[:n], ["sinc", f"{band[0]}-{band[1]}"], exe)


def _noise_source(name: str, n: int, rng: np.random.Generator, tools: dict, babble: list[np.ndarray]) -> np.ndarray:
    """One noise source ``name`` (see :data:`NOISE_SOURCES`) as float32 [n]."""
    if name.startswith("sp:"):
        clip, _, part = name[3:].partition("@")
        y = _real_noise(clip, n, rng, part or None)
        y = np.asarray(y, dtype=np.float64) - float(np.mean(y))
        return (y / (np.sqrt(np.mean(y ** 2)) + 1e-12)).astype(np.float32)
    sx = tools["sox"]
    w = rng.standard_normal(n)
    if name == "hum50":
        y = _harmonics(n, rng, 50.0, 8, 0.7) + 0.05 * _sox(w, ["lowpass", "2000"], sx)
    elif name == "hum60":
        y = _harmonics(n, rng, 60.0, 10, 0.6) + 0.05 * _sox(w, ["lowpass", "2000"], sx)
    elif name == "room_tone":
        y = _sox(w, ["lowpass", "1200", "reverb", "70"], sx) + 0.2 * _harmonics(n, rng, 120.0, 3, 0.5)
    elif name == "hvac":
        y = _sox(w, ["bandpass", "400", "300"], sx) + 0.3 * _harmonics(n, rng, rng.uniform(90, 140), 4, 0.5, 0.01)
    elif name in ("babble_train", "babble_test"):
        y = np.zeros(n)
        for _ in range(int(rng.integers(4, 7))):
            u = babble[int(rng.integers(len(babble)))]
            y += _speech_crop(u, n, rng) * rng.uniform(0.5, 1.0)
        y = _sox(y, ["reverb", "50"], sx)
    elif name == "wind_low":
        y = _sox(w, ["lowpass", "300", "lowpass", "300"], sx) * _envelope(n, rng, 1.5, 0.8)
    elif name == "wind_high":
        y = _sox(w, ["bandpass", "900", "800"], sx) * _envelope(n, rng, 3.0, 0.9)
    elif name == "birds":
        y = _chirps(n, rng, 2500, 6500, 8, 0.08) + 0.1 * _sox(w, ["lowpass", "500"], sx)
    elif name == "crickets":
        y = np.sin(2 * np.pi * rng.uniform(3800, 4800) * _t(n)) * (np.sin(2 * np.pi * rng.uniform(20, 40) * _t(n)) > 0.3)
        y = y + 0.1 * _sox(w, ["highpass", "1000"], sx)
    elif name == "rain":
        y = _clicks(n, rng, 0.004, 0.9, (1500, 7000), sx) + 0.3 * _sox(w, ["highpass", "800"], sx)
    elif name == "stream":
        y = _sox(w, ["bandpass", "2500", "2000"], sx) * _envelope(n, rng, 25.0, 0.6) + 0.3 * _sox(w, ["lowpass", "700"], sx)
    elif name == "rumble":
        y = _sox(np.cumsum(w) / 50.0, ["highpass", "20", "lowpass", "150"], sx) * _envelope(n, rng, 0.5, 0.3)
    elif name == "engine_low":
        y = _harmonics(n, rng, rng.uniform(28, 45), 12, 0.8, 0.02) + 0.2 * _sox(w, ["lowpass", "400"], sx)
    elif name == "engine_high":
        y = _harmonics(n, rng, rng.uniform(90, 140), 8, 0.7, 0.03) + 0.2 * _sox(w, ["bandpass", "1500", "1000"], sx)
    elif name == "clatter":
        y = _clicks(n, rng, rng.uniform(0.08, 0.2), 0.3, (300, 4000), sx) + 0.1 * _sox(np.cumsum(w) / 50.0, ["lowpass", "200"], sx)
    elif name == "machine_whine":
        y = _harmonics(n, rng, rng.uniform(700, 1100), 3, 0.5, 0.01) * _envelope(n, rng, 2.0, 0.3) \
            + 0.3 * _sox(w, ["lowpass", "300"], sx)
    else:
        raise DataError(f"unknown noise source {name!r}; known: {sorted(s for v in NOISE_SOURCES.values() for p in v.values() for s in p)}")
    y = np.asarray(y, dtype=np.float64)
    y = y - y.mean()
    return (y / (np.sqrt(np.mean(y ** 2)) + 1e-12)).astype(np.float32)


#: environment -> {"train": sources, "test": sources}; the two lists are disjoint, so test noise is unseen
NOISE_SOURCES = {
    "indoor": {"train": ["hum50", "babble_train", "room_tone"], "test": ["hum60", "babble_test", "hvac"]},
    "outdoor": {"train": ["wind_low", "birds", "rain"], "test": ["wind_high", "crickets", "stream"]},
    "transport": {"train": ["rumble", "engine_low", "clatter"], "test": ["engine_high", "machine_whine"]},
}

NOISE_SPLITS = ("types", "instances")

# ---------------------------------------------------------------------------- real recordings (Debian packages)
#: folders of the real recordings; module-level so tests (and users) can point them elsewhere
SONIC_PI_DIR = Path("/usr/share/sonic-pi/samples")
REAL_SPEECH_DIRS = {"asterisk": Path("/usr/share/asterisk/sounds"), "codec2": Path("/usr/share/codec2/raw"),
                    "pocketsphinx": Path("/usr/share/pocketsphinx/test/data")}
#: the Debian package holding each real source
REAL_PACKAGES = {"sonic-pi": "sonic-pi-samples", "asterisk": "asterisk-core-sounds-en-wav",
                 "codec2": "codec2-examples", "pocketsphinx": "pocketsphinx-testdata"}
REAL_CORPORA = ("asterisk", "codec2", "pocketsphinx")
#: codec2's raw folder also holds modem frames and sine sweeps: only these files are speech (8 kHz s16le)
_CODEC2_SPEECH = ("big_dog", "cross", "forig", "hts1", "hts2", "kristoff", "mmt1", "morig", "vk5qi", "ve9qrp_10s")
#: raw (headerless s16le mono) sample rates per corpus
_RAW_RATE = {"codec2": 8000, "pocketsphinx": 16000}

#: real CC0 noise clips from ``sonic-pi-samples`` (name without ``.flac``) per environment, train / test
#: disjoint; used as noise sources ``"sp:<name>"`` next to the synthetic :data:`NOISE_SOURCES`
REAL_NOISE_CLIPS = {
    "indoor": {"train": ["vinyl_hiss", "ambi_glass_hum", "ambi_soft_buzz"],        # hiss, room hum, buzz
               "test": ["ambi_haunted_hum", "ambi_sauna", "perc_till"]},            # hum, sauna room, till
    "outdoor": {"train": ["loop_safari", "ambi_dark_woosh", "misc_crow"],           # nature loop, wind, crow
                "test": ["ambi_lunar_land", "ambi_swoosh"]},                        # open-air ambience, gust
    "transport": {"train": ["loop_3d_printer", "loop_industrial", "mehackit_robot4"],  # printer, machines
                  "test": ["loop_electric", "misc_cineboom", "glitch_robot1"]},        # motor, rumble, servo
}


def load_audio(path: str | os.PathLike, sample_rate: int | None = None) -> np.ndarray:
    """Read an audio file as float32 mono ``[L]`` at 16 kHz (resampled when needed).

    ``.wav`` (16-bit PCM) with the stdlib ``wave``; ``.raw`` as headerless signed 16-bit little-endian mono at
    ``sample_rate`` Hz (required for raw files); anything else (``.flac``, other wav encodings) through a
    ``sox`` pipe. Channels are averaged. ``torchaudio.load`` is not used (it needs torchcodec).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".raw":
        if sample_rate is None or int(sample_rate) <= 0:
            raise DataError(f"{path} is headerless raw audio: pass its sample_rate (Hz)")
        b = path.read_bytes()
        x = np.frombuffer(b[: len(b) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        return _resample(x, int(sample_rate))
    if suffix == ".wav":
        try:
            x, sr = _read_wav(path.read_bytes())
            return _resample(x, sr)
        except DataError:
            pass  # not 16-bit PCM: let sox convert it
    exe = shutil.which("sox")
    if exe is None:
        raise MissingDependencyError(f"reading {path.name} needs sox; install it with:\napt-get install sox libsox-fmt-all")
    out = subprocess.run([exe, "-q", "-V1", str(path), "-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1",
                          "-r", str(SAMPLE_RATE), "-"], capture_output=True, timeout=120)
    if out.returncode != 0:
        raise DataError(f"sox could not read {path}: {out.stderr.decode(errors='replace')[:200]} "
                        "(apt-get install libsox-fmt-all)")
    return np.frombuffer(out.stdout, dtype="<f4").astype(np.float32)


def real_speech_files(min_seconds: float = 0.6) -> dict[str, list[tuple[Path, int | None]]]:
    """Installed real speech recordings: corpus -> sorted ``[(path, raw sample rate or None)]``.

    asterisk: the English prompts (``en*/**/*.wav``, 8 kHz, silence files dropped, at least ``min_seconds``);
    codec2: the speech files of ``codec2-examples`` (``raw/*.raw`` at 8 kHz, ``speech_orig_16k.wav``);
    pocketsphinx: every ``.wav`` and ``.raw`` (16 kHz) under ``test/data``. Absent corpora map to ``[]``.
    """
    out: dict[str, list[tuple[Path, int | None]]] = {c: [] for c in REAL_CORPORA}
    root = Path(REAL_SPEECH_DIRS["asterisk"])
    if root.is_dir():
        seen = set()
        for p in sorted(root.glob("en*/**/*.wav")):
            r = p.resolve()
            if r in seen or "silence" in p.parts or not r.is_file():
                continue
            seen.add(r)
            try:
                with wave.open(str(r)) as w:
                    if w.getnframes() / w.getframerate() < min_seconds:
                        continue
            except (wave.Error, EOFError, OSError):
                continue
            out["asterisk"].append((r, None))
    root = Path(REAL_SPEECH_DIRS["codec2"])
    if root.is_dir():
        out["codec2"] = [(root / f"{n}.raw", _RAW_RATE["codec2"]) for n in _CODEC2_SPEECH if (root / f"{n}.raw").is_file()]
        if (root / "speech_orig_16k.wav").is_file():
            out["codec2"].append((root / "speech_orig_16k.wav", None))
    root = Path(REAL_SPEECH_DIRS["pocketsphinx"])
    if root.is_dir():
        out["pocketsphinx"] = sorted([(p, None) for p in root.rglob("*.wav")] +
                                     [(p, _RAW_RATE["pocketsphinx"]) for p in root.rglob("*.raw")])
    return out


def missing_real_noise_clips() -> list[str]:
    """Names of the :data:`REAL_NOISE_CLIPS` missing on disk (empty list: all present)."""
    names = [n for e in REAL_NOISE_CLIPS.values() for p in e.values() for n in p]
    return [n for n in names if not (Path(SONIC_PI_DIR) / f"{n}.flac").is_file()]


_CLIP_CACHE: dict[str, np.ndarray] = {}


#: "instances" noise split: the share of every real clip (its start) that train mixtures use; test: the rest
TRAIN_PART = 0.7


def _real_noise(name: str, n: int, rng: np.random.Generator, part: str | None = None) -> np.ndarray:
    """``n`` samples of sonic-pi clip ``name`` (looped from a random start, random polarity); ``part``
    "train" / "test": only the first :data:`TRAIN_PART` of the clip / the rest."""
    path = Path(SONIC_PI_DIR) / f"{name}.flac"
    key = str(path)
    if key not in _CLIP_CACHE:
        x = load_audio(path)
        x = x - x.mean()
        if len(x) < 64 or not np.any(x):
            raise DataError(f"the noise clip {path} is empty")
        _CLIP_CACHE[key] = x
    x = _CLIP_CACHE[key]
    if part not in (None, "train", "test"):
        raise DataError(f"noise clip part must be 'train' or 'test', got {part!r} (source 'sp:{name}@{part}')")
    if part is not None:
        cut = int(round(TRAIN_PART * len(x)))
        x = x[:cut] if part == "train" else x[cut:]
    reps = int(np.ceil((n + len(x)) / len(x)))
    # a window with sound in it (energy >= 30% of the loudest window), from a random phase of the loop
    s = int(rng.integers(len(x)))
    return _speech_crop(np.tile(x, reps + 1)[s:], n, rng) * float(rng.choice([-1.0, 1.0]))


def noise_sources(env: str, which: str, real_noise: bool = True, split: str = "types") -> list[str]:
    """Noise source names of ``env`` for split ``which`` (``train``/``test``): the synthetic ones, plus the
    real clips ``"sp:<name>"`` when ``real_noise``.

    ``split="types"`` (default): train and test use disjoint source types (test noise is of a kind never
    heard in training). ``split="instances"``: both splits use every source type of the environment, as
    unseen instances: synthetic sources are fresh renders (babble from the disjoint test speakers), real
    clips are cut in time (``"sp:<name>@train"``: the first :data:`TRAIN_PART` of the recording, ``@test``:
    the rest), as in speech-enhancement corpora whose test noise is unseen recordings of the same categories.
    """
    if split not in NOISE_SPLITS:
        raise DataError(f"split must be one of {NOISE_SPLITS}, got {split!r}")
    if which not in ("train", "test"):
        raise DataError(f"which must be 'train' or 'test', got {which!r}")
    if split == "types":
        out = list(NOISE_SOURCES[env][which])
        if real_noise:
            out += [f"sp:{n}" for n in REAL_NOISE_CLIPS[env][which]]
        return out
    synth = NOISE_SOURCES[env]["train"] + NOISE_SOURCES[env]["test"]
    out = list(dict.fromkeys(("babble_" + which) if src.startswith("babble_") else src for src in synth))
    if real_noise:
        out += [f"sp:{n}@{which}" for n in REAL_NOISE_CLIPS[env]["train"] + REAL_NOISE_CLIPS[env]["test"]]
    return out


# ---------------------------------------------------------------------------- the dataset
@dataclass(frozen=True)
class SpeechDataConfig:
    """What to build: clips per environment, clip length (s), SNR range (dB), utterance pool sizes, seed.

    ``use_flite``: also speak every 4th utterance with a flite voice; set to False by the builder when flite
    is not installed (so the cache key says which speech was used).
    ``real_noise``: add the real sonic-pi clips (:data:`REAL_NOISE_CLIPS`) to every environment's sources.
    ``real_test_per_env`` / ``real_corpora``: size and speech corpora of the held-out real-speech test split
    (recorded speech + each environment's TEST noise); ``real_corpora=()`` disables it. The builder drops
    what is not installed (with a warning) so the cache key records the data actually used."""
    train_per_env: int = 96
    test_per_env: int = 32
    clip_seconds: float = 1.0
    snr_db: tuple[float, float] = (-5.0, 10.0)
    environments: tuple[str, ...] = ENVIRONMENTS
    train_utterances: int = 96
    test_utterances: int = 32
    babble_utterances: int = 16
    use_flite: bool = True
    real_noise: bool = True
    real_test_per_env: int = 32
    real_corpora: tuple[str, ...] = REAL_CORPORA
    seed: int = 0
    noise_split: str = "types"          # "types": disjoint source types; "instances": unseen renders / clip parts

    def validate(self) -> "SpeechDataConfig":
        for name in ("train_per_env", "test_per_env", "train_utterances", "test_utterances", "babble_utterances",
                     "real_test_per_env"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise DataError(f"seed must be a non-negative int, got {self.seed!r}")
        if not (0.1 <= float(self.clip_seconds) <= 30.0):
            raise DataError(f"clip_seconds must be in [0.1, 30] seconds, got {self.clip_seconds!r}")
        lo, hi = (float(v) for v in self.snr_db)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise DataError(f"snr_db must be (low, high) in dB with low <= high, got {self.snr_db!r}")
        envs = tuple(self.environments)
        unknown = [e for e in envs if e not in NOISE_SOURCES]
        if not envs or unknown or len(set(envs)) != len(envs):
            raise DataError(f"environments must be distinct names from {list(NOISE_SOURCES)}, got {envs!r}")
        if self.noise_split not in NOISE_SPLITS:
            raise DataError(f"noise_split must be one of {NOISE_SPLITS}, got {self.noise_split!r}")
        bad = [c for c in self.real_corpora if c not in REAL_CORPORA]
        if bad or len(set(self.real_corpora)) != len(tuple(self.real_corpora)):
            raise DataError(f"real_corpora must be distinct names from {list(REAL_CORPORA)}, got {self.real_corpora!r}")
        return self

    @property
    def num_samples(self) -> int:
        return int(round(float(self.clip_seconds) * SAMPLE_RATE))

    def key(self) -> str:
        d = asdict(self)
        d["snr_db"] = [float(v) for v in self.snr_db]
        d["environments"] = list(self.environments)
        d["real_corpora"] = list(self.real_corpora)
        d["version"] = FORMAT_VERSION
        if d["noise_split"] == "types":
            del d["noise_split"]  # the default keeps the keys (and cache files) of datasets built before it
        else:
            d["train_part"] = TRAIN_PART
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SpeechSplit:
    """One split: ``noisy``/``clean`` float32 [N, L] (16 kHz), ``env`` int64 [N] (ticket id),
    ``snr_db`` float32 [N] (requested mixing SNR), ``source`` [N] noise source names (``sp:<clip>`` = a real
    sonic-pi recording), ``speech`` [N] clean speech origin (``synthetic`` or ``<corpus>:<file stem>``)."""
    noisy: np.ndarray
    clean: np.ndarray
    env: np.ndarray
    snr_db: np.ndarray
    source: np.ndarray
    speech: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.noisy.shape[0])

    def tensors(self):
        """``(noisy, clean, env)`` as torch tensors ``[N, L]``, ``[N, L]``, ``[N]``."""
        import torch
        return torch.from_numpy(self.noisy.copy()), torch.from_numpy(self.clean.copy()), torch.from_numpy(self.env.copy())


@dataclass
class SpeechData:
    """Train and test splits plus the environment names (ticket k = ``environments[k]``); ``real``: the
    held-out real-speech test split (None when no real speech corpus is installed or requested)."""
    train: SpeechSplit
    test: SpeechSplit
    environments: tuple[str, ...]
    config: SpeechDataConfig
    path: Path | None = None
    real: SpeechSplit | None = None


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean + g * noise`` with g chosen so that ``10 log10(|clean|^2 / |g noise|^2) = snr_db`` (dB).

    clean, noise: float [L] of equal length; returns float32 [L].
    """
    clean, noise = np.asarray(clean, dtype=np.float64), np.asarray(noise, dtype=np.float64)
    if clean.ndim != 1 or clean.shape != noise.shape:
        raise DataError(f"clean and noise must be 1-D of equal length, got {clean.shape} and {noise.shape}")
    if not np.isfinite(snr_db):
        raise DataError(f"snr_db must be a finite number of dB, got {snr_db!r}")
    pc, pn = float(np.sum(clean ** 2)), float(np.sum(noise ** 2))
    if pc <= 0 or pn <= 0:
        raise DataError("clean and noise must both have non-zero energy to mix at an SNR")
    g = np.sqrt(pc / (pn * 10 ** (snr_db / 10)))
    return (clean + g * noise).astype(np.float32)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """SNR in dB of mixtures ``noisy`` against their ``clean`` part, ``[N, L]`` (or ``[L]``) -> ``[N]``."""
    clean, noisy = np.atleast_2d(np.asarray(clean, np.float64)), np.atleast_2d(np.asarray(noisy, np.float64))
    if clean.shape != noisy.shape:
        raise DataError(f"clean {clean.shape} and noisy {noisy.shape} must have the same shape")
    return 10 * np.log10(np.sum(clean ** 2, -1) / np.maximum(np.sum((noisy - clean) ** 2, -1), 1e-30))




def _split_arrays(prefix: str, s: SpeechSplit, dtype=np.float32) -> dict:
    out = {f"{prefix}_noisy": s.noisy.astype(dtype), f"{prefix}_clean": s.clean.astype(dtype), f"{prefix}_env": s.env,
           f"{prefix}_snr_db": s.snr_db, f"{prefix}_source": s.source.astype("U32")}
    if s.speech is not None:
        out[f"{prefix}_speech"] = s.speech.astype("U64")
    return out


def _save(path: Path, data: SpeechData, dtype=np.float32) -> None:
    arrays = {**_split_arrays("train", data.train, dtype), **_split_arrays("test", data.test, dtype),
              **(_split_arrays("real", data.real, dtype) if data.real is not None else {}),
              "environments": np.array(data.environments, dtype="U32"),
              "meta": np.array(json.dumps({"version": FORMAT_VERSION, "key": data.config.key(),
                                           "config": _config_json(data.config)}))}
    atomic_write_npz(path, arrays)


def _config_json(cfg: SpeechDataConfig) -> dict:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_noisy_speech(data: SpeechData, path: str | os.PathLike, *, half: bool = False) -> Path:
    """Write ``data`` to ``path`` (``.npz``, no pickle, atomic) with its configuration, so that
    :func:`load_noisy_speech` can read it on a machine without espeak-ng, sox or the real recordings
    (e.g. a GPU machine). ``half``: store the waveforms as float16 (half the size; rounding error about
    -66 dB relative to full scale; read back as float32). Returns the path."""
    if not isinstance(half, bool):
        raise DataError(f"half must be True or False, got {half!r}")
    if not isinstance(data, SpeechData):
        raise DataError(f"data must be a SpeechData (from build_noisy_speech), got {type(data).__name__}")
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"the dataset file must end in .npz, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, data, np.float16 if half else np.float32)
    return path


def load_noisy_speech(path: str | os.PathLike) -> SpeechData:
    """Read a dataset written by :func:`save_noisy_speech` (or a ``build_noisy_speech`` cache file of format
    2 or later that records its configuration) without rebuilding or checking the installed sources."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no dataset file at {str(path)!r}; write one with save_noisy_speech(build_noisy_speech(...), path)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise CorruptFileError(f"the dataset file {path} is unreadable ({type(e).__name__}: {e})") from e
    if meta.get("version") != FORMAT_VERSION or "config" not in meta:
        raise CorruptFileError(f"{path} is a dataset file of format {meta.get('version')!r} without its configuration "
                               f"(this version reads format {FORMAT_VERSION}); re-save it with save_noisy_speech")
    c = meta["config"]
    try:
        cfg = SpeechDataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}).validate()
    except (TypeError, DataError) as e:
        raise CorruptFileError(f"{path} records a configuration this version cannot read ({e}); rebuild it") from e
    return _load(path, cfg)


def _load(path: Path, cfg: SpeechDataConfig) -> SpeechData:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != cfg.key():
                raise CorruptFileError(f"{path} holds another dataset configuration; delete it to rebuild")
            splits = {p: SpeechSplit(z[f"{p}_noisy"].astype(np.float32, copy=False),
                                     z[f"{p}_clean"].astype(np.float32, copy=False), z[f"{p}_env"], z[f"{p}_snr_db"],
                                     z[f"{p}_source"], z[f"{p}_speech"] if f"{p}_speech" in z.files else None)
                      for p in ("train", "test", "real") if f"{p}_noisy" in z.files}
            envs = tuple(str(e) for e in z["environments"])
    except CorruptFileError:
        raise
    except Exception as e:  # zip / key / value errors: a damaged cache file
        raise CorruptFileError(f"the cached dataset {path} is unreadable ({type(e).__name__}: {e}); "
                               "delete it and the builder will recreate it") from e
    return SpeechData(splits["train"], splits["test"], envs, cfg, path, splits.get("real"))


def _build_split(cfg, which, per_env, utterances, babble, tools, rng, names=None) -> SpeechSplit:
    """``per_env`` mixtures per environment of crops of ``utterances`` (origin ``names``, cycled through
    ``names``' groups when given) with the ``which`` noise sources."""
    n = cfg.num_samples
    lo, hi = (float(v) for v in cfg.snr_db)
    noisy, clean, env, snrs, source, speech = [], [], [], [], [], []
    groups = None
    if names is not None:  # real speech: take the corpora in turn so each is represented in every environment
        corpora = sorted({m.split(":")[0] for m in names})
        groups = [[j for j, m in enumerate(names) if m.split(":")[0] == c] for c in corpora]
    for k, e in enumerate(cfg.environments):
        sources = noise_sources(e, which, cfg.real_noise, cfg.noise_split)
        for i in range(per_env):
            if groups is None:
                u = int(rng.integers(len(utterances)))
            else:
                g = groups[(i + k) % len(groups)]
                u = g[int(rng.integers(len(g)))]
            c = _speech_crop(utterances[u], n, rng)
            c = c / (np.sqrt(np.mean(c.astype(np.float64) ** 2)) + 1e-12) * 0.05
            src = sources[i % len(sources)]
            noise = _noise_source(src, n, rng, tools, babble)
            s = float(rng.uniform(lo, hi))
            x = mix_at_snr(c, noise, s)
            peak = float(np.max(np.abs(x)))
            g = 0.9 / peak if peak > 0.9 else 1.0  # same gain on both keeps the SNR
            noisy.append(x * g)
            clean.append((c * g).astype(np.float32))
            env.append(k)
            snrs.append(s)
            source.append(src)
            speech.append("synthetic" if names is None else names[u])
    return SpeechSplit(np.stack(noisy).astype(np.float32), np.stack(clean).astype(np.float32),
                       np.array(env, dtype=np.int64), np.array(snrs, dtype=np.float32), np.array(source, dtype="U32"),
                       np.array(speech, dtype="U64"))


def _resolve_real(cfg: SpeechDataConfig, require_real: bool) -> SpeechDataConfig:
    """Drop the real sources that are not installed (warning), or raise when ``require_real``."""
    missing_pkgs, notes = [], []
    real_noise = cfg.real_noise
    if real_noise:
        gone = missing_real_noise_clips()
        if gone:
            missing_pkgs.append(REAL_PACKAGES["sonic-pi"])
            notes.append(f"real noise clips ({len(gone)} sonic-pi-samples clips missing under {SONIC_PI_DIR})")
            real_noise = False
        elif shutil.which("sox") is None:
            missing_pkgs += ["sox", "libsox-fmt-all"]
            notes.append("real noise clips (reading flac needs sox)")
            real_noise = False
    corpora = tuple(cfg.real_corpora)
    if corpora:
        files = real_speech_files(min_seconds=0.6 * float(cfg.clip_seconds))
        absent = [c for c in corpora if not files[c]]
        for c in absent:
            missing_pkgs.append(REAL_PACKAGES[c])
            notes.append(f"real speech corpus {c!r} (nothing under {REAL_SPEECH_DIRS[c]})")
        corpora = tuple(c for c in corpora if files[c])
    if notes:
        line = "apt-get install " + " ".join(missing_pkgs)
        if require_real:
            raise MissingDependencyError("the real recordings are missing: " + "; ".join(notes)
                                         + f"; install them with:\n{line}")
        warnings.warn("noisy-speech dataset: skipping " + "; ".join(notes) + f" (install with: {line})", stacklevel=3)
    return SpeechDataConfig(**{**asdict(cfg), "real_noise": real_noise, "real_corpora": corpora})


def _load_real_speech(cfg: SpeechDataConfig, rng: np.random.Generator, per_corpus: int = 48):
    """Recorded utterances (16 kHz) of the configured corpora: at most ``per_corpus`` files each, drawn
    deterministically; returns (waveforms, ``corpus:stem`` names)."""
    files = real_speech_files(min_seconds=0.6 * float(cfg.clip_seconds))
    waves, names = [], []
    for c in cfg.real_corpora:
        fl = files[c]
        pick = sorted(rng.choice(len(fl), size=min(per_corpus, len(fl)), replace=False).tolist())
        for j in pick:
            path, rate = fl[j]
            x = load_audio(path, rate)
            if np.sqrt(np.mean(x.astype(np.float64) ** 2)) < 1e-4:
                continue  # a silent recording carries no speech
            waves.append(x)
            names.append(f"{c}:{path.stem}")
    return waves, names


def _sources_fingerprint(cfg: SpeechDataConfig) -> str:
    """Hash of the installed real files the dataset reads (folders, names, sizes): another folder or an
    upgraded package gives another cache file instead of a stale one."""
    items: list = []
    if cfg.real_noise:
        for env in cfg.environments:
            for split in ("train", "test"):
                for name in REAL_NOISE_CLIPS[env][split]:
                    p = Path(SONIC_PI_DIR) / f"{name}.flac"
                    items.append([str(p), p.stat().st_size if p.is_file() else -1])
    if cfg.real_corpora:
        files = real_speech_files(min_seconds=0.6 * float(cfg.clip_seconds))
        for c in cfg.real_corpora:
            items += [[str(p), p.stat().st_size, rate] for p, rate in files[c]]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:8]


def build_noisy_speech(config: SpeechDataConfig | None = None, *, cache: str | os.PathLike | None = None,
                       use_cache: bool = True, require_real: bool = False, **overrides) -> SpeechData:
    """Build (or load from the cache) the noisy-speech dataset.

    Args:
        config: a :class:`SpeechDataConfig`; keyword ``overrides`` replace its fields (e.g. ``seed=1``).
        cache: cache folder (default ``$RTL_CACHE`` or ``~/.cache/rtl-plugin``); the file is
            ``<cache>/speech/noisy_speech_<config hash>.npz``.
        use_cache: False builds afresh and does not touch the cache.
        require_real: raise MissingDependencyError (with the apt line) when a requested real source (sonic-pi
            noise clips, a real speech corpus) is not installed; by default it is skipped with a warning.
    Returns:
        :class:`SpeechData`: ``train`` / ``test`` splits with noisy/clean ``[N, L]`` float32 at 16 kHz,
        environment ids ``[N]`` (the ticket of each clip), the requested SNRs (dB) and noise source names.
        ``real``: the held-out real-speech split (recorded speech x TEST noise), or None.
    Raises:
        MissingDependencyError when espeak-ng or sox is not installed (``apt-get install espeak-ng sox``),
        or a real source is missing and ``require_real``.
    """
    cfg = config if config is not None else SpeechDataConfig()
    if not isinstance(cfg, SpeechDataConfig):
        raise DataError(f"config must be a SpeechDataConfig, got {type(cfg).__name__}")
    if overrides:
        bad = sorted(set(overrides) - set(asdict(cfg)))
        if bad:
            raise DataError(f"unknown dataset settings {bad}; valid: {sorted(asdict(cfg))}")
        cfg = SpeechDataConfig(**{**asdict(cfg), **overrides})
    cfg = SpeechDataConfig(**{**asdict(cfg), "snr_db": tuple(float(v) for v in cfg.snr_db),
                              "environments": tuple(cfg.environments),
                              "real_corpora": tuple(cfg.real_corpora)}).validate()
    cfg = _resolve_real(cfg, require_real)
    if cfg.use_flite and shutil.which("flite") is None:
        # the data depend on whether flite voices are available: the config (and the cache key) records it
        cfg = SpeechDataConfig(**{**asdict(cfg), "use_flite": False})
    path = default_cache_dir(cache) / "speech" / f"noisy_speech_{cfg.key()}_{_sources_fingerprint(cfg)}.npz"
    if use_cache and path.exists():
        return _load(path, cfg)
    tools = check_tools()
    flite_ok = cfg.use_flite
    rng = np.random.default_rng([cfg.seed, 6])
    pools = {}
    for name, count, voices in (("train", cfg.train_utterances, _ESPEAK_TARGET),
                                ("test", cfg.test_utterances, _ESPEAK_TARGET),
                                ("babble_train", cfg.babble_utterances, _ESPEAK_BABBLE_TRAIN),
                                ("babble_test", cfg.babble_utterances, _ESPEAK_BABBLE_TEST)):
        pools[name] = _synthesise(_utterance_specs(count, rng, voices, flite_ok), tools)
    train = _build_split(cfg, "train", cfg.train_per_env, pools["train"], pools["babble_train"], tools, rng)
    test = _build_split(cfg, "test", cfg.test_per_env, pools["test"], pools["babble_test"], tools, rng)
    real = None
    if cfg.real_corpora:  # its own generator: the synthetic splits do not depend on the real corpora
        rng_real = np.random.default_rng([cfg.seed, 6, 1])
        waves, names = _load_real_speech(cfg, rng_real)
        if waves:
            real = _build_split(cfg, "test", cfg.real_test_per_env, waves, pools["babble_test"], tools, rng_real,
                                names=names)
    data = SpeechData(train, test, tuple(cfg.environments), cfg, path if use_cache else None, real)
    if use_cache:
        _save(path, data)
    return data
