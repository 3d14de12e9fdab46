"""The offline noisy-speech builder (rtl_plugin.tasks.speech.data) and the speech-enhancement pipeline (issue #6)."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

import rtl_plugin as rtl
from rtl_plugin.tasks.speech import data as speech
from rtl_plugin.tasks.speech.data import (NOISE_SOURCES, REAL_NOISE_CLIPS, SpeechDataConfig, build_noisy_speech, load_audio,
                               mix_at_snr, noise_sources, snr_db)

TINY = dict(train_per_env=4, test_per_env=3, train_utterances=4, test_utterances=3, babble_utterances=4,
            real_test_per_env=3)
REAL_APT = ("apt-get install sox libsox-fmt-all sonic-pi-samples asterisk-core-sounds-en-wav codec2-examples "
            "pocketsphinx-testdata")


def _need_tools():
    try:
        speech.check_tools()
    except rtl.MissingDependencyError:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng/sox missing in CI: .ci/run must install the Debian packages espeak-ng sox flite")
        pytest.skip("espeak-ng/sox missing: apt-get install espeak-ng sox (CI installs them and requires this test)")


def _need_real():
    """The real recordings (sonic-pi noise clips, asterisk/codec2/pocketsphinx speech): skip when absent,
    except in CI (env CI set), where their absence fails the test."""
    _need_tools()
    missing = []
    if speech.missing_real_noise_clips():
        missing.append("sonic-pi-samples")
    files = speech.real_speech_files()
    missing += [speech.REAL_PACKAGES[c] for c in speech.REAL_CORPORA if not files[c]]
    if missing:
        msg = f"real recordings missing ({', '.join(missing)}): {REAL_APT}"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; .ci/run must install them")
        pytest.skip(f"{msg} (CI installs them and requires this test)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _need_tools()
    return build_noisy_speech(SpeechDataConfig(**TINY, seed=3), cache=tmp_path_factory.mktemp("cache"))


# ----------------------------------------------------------------------------- no tools needed


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    real = shutil.which
    monkeypatch.setattr(speech.shutil, "which", lambda name, *a, **k: None if name == "espeak-ng" else real(name, *a, **k))
    with pytest.raises(rtl.MissingDependencyError, match="apt-get install espeak-ng sox") as e:
        build_noisy_speech(SpeechDataConfig(**TINY), cache=tmp_path)
    assert "espeak-ng" in str(e.value).split("install")[0]
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH at all
    monkeypatch.setattr(speech.shutil, "which", real)
    with pytest.raises(rtl.MissingDependencyError, match="espeak-ng, sox"):
        build_noisy_speech(SpeechDataConfig(**TINY), cache=tmp_path)


def test_mix_at_snr_hits_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal(16000).astype(np.float32) * 0.1
    noise = rng.standard_normal(16000).astype(np.float32) * 3.0
    for s in (-5.0, 0.0, 2.5, 10.0):
        assert abs(float(snr_db(clean, mix_at_snr(clean, noise, s))[0]) - s) < 1e-3
    with pytest.raises(rtl.DataError, match="equal length"):
        mix_at_snr(clean, noise[:100], 0.0)
    with pytest.raises(rtl.DataError, match="non-zero energy"):
        mix_at_snr(np.zeros(10), np.ones(10), 0.0)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(rtl.DataError, match="train_per_env"):
        build_noisy_speech(train_per_env=0, cache=tmp_path)
    with pytest.raises(rtl.DataError, match="snr_db"):
        build_noisy_speech(snr_db=(10, -5), cache=tmp_path)
    with pytest.raises(rtl.DataError, match="environments"):
        build_noisy_speech(environments=("indoor", "space"), cache=tmp_path)
    with pytest.raises(rtl.DataError, match="unknown dataset settings"):
        build_noisy_speech(clips=3, cache=tmp_path)


def test_noise_sources_split_disjoint_per_environment():
    for env, split in NOISE_SOURCES.items():
        assert len(split["train"]) >= 2 and len(split["test"]) >= 2, env
        assert not set(split["train"]) & set(split["test"]), env
    every = [s for sp in NOISE_SOURCES.values() for p in sp.values() for s in p]
    assert len(every) == len(set(every))  # no source shared across environments either


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("RTL_CACHE", str(tmp_path / "c"))
    assert speech.default_cache_dir() == tmp_path / "c"
    assert speech.default_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("RTL_CACHE")
    assert speech.default_cache_dir() == speech.Path.home() / ".cache" / "rtl-plugin"


# ----------------------------------------------------------------------------- builder (espeak-ng + sox)


def test_dataset_shapes_snr_and_sources(tiny):
    L = 16000
    K = len(tiny.environments)
    for split, per in ((tiny.train, TINY["train_per_env"]), (tiny.test, TINY["test_per_env"])):
        assert split.noisy.shape == split.clean.shape == (K * per, L)
        assert split.noisy.dtype == np.float32 and np.isfinite(split.noisy).all()
        assert np.bincount(split.env, minlength=K).tolist() == [per] * K
        assert np.all((split.snr_db >= -5) & (split.snr_db <= 10))
        # the stored mixture's SNR is the requested one (float32 storage): within 0.1 dB
        assert np.max(np.abs(snr_db(split.clean, split.noisy) - split.snr_db)) < 0.1
        assert np.abs(split.noisy).max() <= 1.0
        assert (np.sqrt((split.clean ** 2).mean(1)) > 1e-3).all()  # every clip holds speech
    for k, env in enumerate(tiny.environments):
        tr = set(tiny.train.source[tiny.train.env == k].tolist())
        te = set(tiny.test.source[tiny.test.env == k].tolist())
        real = tiny.config.real_noise
        assert tr <= set(noise_sources(env, "train", real)) and te <= set(noise_sources(env, "test", real))
        assert tr and te and not tr & te  # test noise is unseen


def test_builder_is_deterministic_in_the_seed(tiny, tmp_path):
    again = build_noisy_speech(SpeechDataConfig(**TINY, seed=3), use_cache=False)
    pairs = [(tiny.train, again.train), (tiny.test, again.test)]
    assert (tiny.real is None) == (again.real is None)
    if tiny.real is not None:
        pairs.append((tiny.real, again.real))
        assert tiny.real.speech.tolist() == again.real.speech.tolist()
    for a, b in pairs:
        np.testing.assert_array_equal(a.noisy, b.noisy)
        np.testing.assert_array_equal(a.clean, b.clean)
        np.testing.assert_array_equal(a.snr_db, b.snr_db)
    other = build_noisy_speech(SpeechDataConfig(**TINY, seed=4), cache=tmp_path)
    assert not np.array_equal(other.train.noisy, tiny.train.noisy)
    assert not np.array_equal(other.train.snr_db, tiny.train.snr_db)


def test_cache_round_trip_and_corruption(tiny):
    path = tiny.path
    assert path is not None and path.exists() and path.suffix == ".npz"
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temp file
    loaded = build_noisy_speech(tiny.config, cache=path.parent.parent)
    assert loaded.path == path
    np.testing.assert_array_equal(loaded.train.noisy, tiny.train.noisy)
    np.testing.assert_array_equal(loaded.test.clean, tiny.test.clean)
    assert loaded.test.source.tolist() == tiny.test.source.tolist()
    assert loaded.environments == tiny.environments
    with np.load(path, allow_pickle=False) as z:  # plain arrays, readable without pickle
        assert "train_noisy" in z.files
    bad = path.parent.parent / "bad"
    target = bad / "speech" / path.name
    target.parent.mkdir(parents=True)
    target.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(rtl.CorruptFileError, match="delete it"):
        build_noisy_speech(tiny.config, cache=bad)


# ----------------------------------------------------------------------------- pipeline


def test_quick_pipeline_gives_finite_si_snri_for_every_method(tmp_path):
    _need_tools()
    import torch
    from rtl_plugin.tasks.speech.runner import SpeechConfig, router_features, run_speech
    cfg = SpeechConfig.quick(sparsities=(0.5,), cache=str(tmp_path / "cache"), **TINY, batch_size=6)
    res = run_speech(cfg, tmp_path / "run")
    got = {(r["method"], r["routing"]) for r in res["rows"]}
    assert got == {("rtl", "context"), ("rtl", "learned"), ("dense", "none"), ("single_imp", "none"),
                   ("multi_imp", "context")}
    for r in res["rows"]:
        assert math.isfinite(r["metrics"]["si_snri"]), r
        assert set(r["per_env_si_snri"]) == {"indoor", "outdoor", "transport"}
        assert r["params"] > 0
    by = {(r["method"], r["routing"]): r for r in res["rows"]}
    assert by[("rtl", "context")]["params"] < by[("dense", "none")]["params"] < by[("multi_imp", "context")]["params"]
    assert 0.0 <= res["router"]["accuracy"] <= 1.0
    assert set(res["targets"]) == {"rtl_ge_single_imp", "rtl_ge_multi_imp", "router_within_0.2db_of_oracle"}
    assert (tmp_path / "run" / "results.json").exists()
    if res["rows_real"]:  # recorded-speech test mixtures: every method scored on them too
        assert {(r["method"], r["routing"]) for r in res["rows_real"]} == got
        assert all(r["test_set"] == "real" and math.isfinite(r["metrics"]["si_snri"]) for r in res["rows_real"])
        assert set(res["router"]["accuracy_by_test_set"]) == {"synthetic", "real"}
        assert set(res["targets_real"]) == set(res["targets"])
    assert all(os.path.exists(p) for p in res["figures"])
    with pytest.raises(rtl.DataError, match="router_features"):
        router_features(torch.zeros(2, 100))
    with pytest.raises(rtl.SparsityError, match="sparsities"):
        run_speech(SpeechConfig.quick(sparsities=(0.5, 0.25)), tmp_path / "x")
    with pytest.raises(rtl.DataError, match="per_ticket_state"):
        run_speech(SpeechConfig.quick(per_ticket_state="no"), tmp_path / "x")


def test_without_flite_builds_espeak_only_under_its_own_cache_key(tiny, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(speech.shutil, "which", lambda name, *a, **k: None if name == "flite" else real(name, *a, **k))
    data = build_noisy_speech(SpeechDataConfig(**TINY, seed=3), cache=tiny.path.parent.parent)
    assert data.config.use_flite is False and np.isfinite(data.train.noisy).all()
    if real("flite") is not None:  # flite changes the speech, so it must not share the cached file
        assert data.path != tiny.path
        assert not np.array_equal(data.train.clean, tiny.train.clean)


# ----------------------------------------------------------------------------- real recordings


def _tone_int16(sr, seconds, freq=1000.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[int(np.argmax(spec))])


def test_load_audio_resamples_a_known_tone_to_16khz(tmp_path):
    import wave
    pcm = _tone_int16(8000, 0.5)
    raw = tmp_path / "tone8k.raw"
    raw.write_bytes(pcm.tobytes())
    wav = tmp_path / "tone8k.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    for path, rate in ((raw, 8000), (wav, None)):
        x = load_audio(path, rate)
        assert x.dtype == np.float32 and x.shape == (8000,)  # 0.5 s at 16 kHz
        assert abs(_peak_hz(x) - 1000.0) <= 2.0  # the tone keeps its pitch
        mid = x[1000:-1000]  # away from the filter's edge transients
        assert abs(np.sqrt(np.mean(mid.astype(np.float64) ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # and its level
        assert np.abs(mid).max() < 0.52
    raw16 = tmp_path / "tone16k.raw"
    raw16.write_bytes(_tone_int16(16000, 0.25).tobytes())
    x16 = load_audio(raw16, 16000)
    assert x16.shape == (4000,) and abs(_peak_hz(x16) - 1000.0) <= 4.0  # 16 kHz input is left as is
    with pytest.raises(rtl.DataError, match="sample_rate"):
        load_audio(raw)
    with pytest.raises(rtl.DataError, match="does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_real_noise_clips_are_split_disjoint_and_unseen():
    names = []
    for env, split in REAL_NOISE_CLIPS.items():
        assert len(split["train"]) >= 2 and len(split["test"]) >= 2, env
        assert not set(split["train"]) & set(split["test"]), env
        names += split["train"] + split["test"]
        tr, te = noise_sources(env, "train"), noise_sources(env, "test")
        assert not set(tr) & set(te)
        assert {f"sp:{n}" for n in split["train"]} <= set(tr) and {f"sp:{n}" for n in split["test"]} <= set(te)
        assert noise_sources(env, "train", real_noise=False) == NOISE_SOURCES[env]["train"]
    assert len(names) == len(set(names))  # no clip in two environments or two splits


def test_missing_real_recordings_are_skipped_or_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(speech, "SONIC_PI_DIR", tmp_path / "no-sonic-pi")
    monkeypatch.setattr(speech, "REAL_SPEECH_DIRS", {c: tmp_path / c for c in speech.REAL_CORPORA})
    cfg = SpeechDataConfig(**TINY)
    with pytest.warns(UserWarning, match="skipping real noise clips.*apt-get install sonic-pi-samples"):
        got = speech._resolve_real(cfg, require_real=False)
    assert got.real_noise is False and got.real_corpora == ()  # the cache key records what was used
    assert got.key() != cfg.key()
    with pytest.raises(rtl.MissingDependencyError, match="apt-get install sonic-pi-samples asterisk-core-sounds-en-wav "
                                                         "codec2-examples pocketsphinx-testdata"):
        build_noisy_speech(cfg, cache=tmp_path, require_real=True)
    # a corpus not asked for is not required
    got = speech._resolve_real(SpeechDataConfig(**TINY, real_noise=False, real_corpora=()), require_real=True)
    assert got.real_corpora == ()
    with pytest.raises(rtl.DataError, match="real_corpora"):
        SpeechDataConfig(real_corpora=("timit",)).validate()


def test_real_sources_are_readable_16khz_and_non_silent():
    _need_real()
    files = speech.real_speech_files()
    for corpus in speech.REAL_CORPORA:
        path, rate = files[corpus][0]
        x = load_audio(path, rate)
        assert x.dtype == np.float32 and x.ndim == 1 and len(x) >= 0.6 * 16000, (corpus, path)
        assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 1e-3, (corpus, path)
        if rate == 8000 or (rate is None and path.suffix == ".wav" and "asterisk" in str(path)):
            # 8 kHz speech upsampled: nothing above the old Nyquist frequency (4 kHz)
            spec = np.abs(np.fft.rfft(x)) ** 2
            f = np.fft.rfftfreq(len(x), 1 / 16000)
            assert spec[f > 4200].sum() < 0.01 * spec.sum(), path
    x = load_audio(speech.SONIC_PI_DIR / "vinyl_hiss.flac")  # flac through the sox pipe: 44.1 kHz stereo
    assert abs(len(x) - 8.0 * 16000) < 200 and np.sqrt(np.mean(x ** 2)) > 1e-3


def test_real_speech_test_split(tiny):
    _need_real()
    real = tiny.real
    assert real is not None and tiny.config.real_corpora == speech.REAL_CORPORA and tiny.config.real_noise
    K, per = len(tiny.environments), TINY["real_test_per_env"]
    assert real.noisy.shape == real.clean.shape == (K * per, 16000)  # 1-s clips at 16 kHz
    assert np.bincount(real.env, minlength=K).tolist() == [per] * K
    assert (np.sqrt((real.clean.astype(np.float64) ** 2).mean(1)) > 1e-3).all()  # recorded speech, not silence
    assert np.max(np.abs(snr_db(real.clean, real.noisy) - real.snr_db)) < 0.1
    assert np.all((real.snr_db >= -5) & (real.snr_db <= 10))
    assert {m.split(":")[0] for m in real.speech} == set(speech.REAL_CORPORA)  # every corpus is used
    for k, env in enumerate(tiny.environments):  # only each environment's TEST noise: unseen in training
        src = set(real.source[real.env == k].tolist())
        assert src <= set(noise_sources(env, "test")) and not src & set(tiny.train.source.tolist())
    # real noise clips do reach the training data, and only train clips
    assert any(s.startswith("sp:") for s in tiny.train.source)
    train_clips = {s[3:] for s in tiny.train.source if s.startswith("sp:")}
    assert train_clips <= {n for e in REAL_NOISE_CLIPS.values() for n in e["train"]}
    # the real split survives the cache
    loaded = build_noisy_speech(tiny.config, cache=tiny.path.parent.parent)
    np.testing.assert_array_equal(loaded.real.noisy, real.noisy)
    assert loaded.real.speech.tolist() == real.speech.tolist()


def test_cache_file_depends_on_the_real_source_folders(monkeypatch, tmp_path):
    """Pointing the real recordings elsewhere (or a package upgrade) must not reuse a stale cache file."""
    from rtl_plugin.tasks.speech import data as speech
    cfg = SpeechDataConfig(**TINY)
    before = speech._sources_fingerprint(cfg)
    assert before == speech._sources_fingerprint(cfg)  # deterministic
    monkeypatch.setattr(speech, "SONIC_PI_DIR", tmp_path / "elsewhere")
    assert speech._sources_fingerprint(cfg) != before


def test_save_and_load_dataset_file_without_the_builder(tiny, tmp_path, monkeypatch):
    """A saved dataset reads back on a machine without espeak-ng / the real recordings (the GPU machine)."""
    from rtl_plugin.tasks.speech.data import load_noisy_speech, save_noisy_speech
    p = save_noisy_speech(tiny, tmp_path / "d" / "speech.npz")
    half = save_noisy_speech(tiny, tmp_path / "half.npz", half=True)
    assert half.stat().st_size < 0.7 * p.stat().st_size
    monkeypatch.setattr(speech.shutil, "which", lambda *a, **k: None)  # no tools at all
    got = load_noisy_speech(p)
    assert got.config == tiny.config and got.environments == tiny.environments
    np.testing.assert_array_equal(got.train.noisy, tiny.train.noisy)
    np.testing.assert_array_equal(got.test.clean, tiny.test.clean)
    assert (got.real is None) == (tiny.real is None)
    h = load_noisy_speech(half)
    assert h.train.noisy.dtype == np.float32
    assert np.abs(h.train.noisy - tiny.train.noisy).max() < 1e-3 * max(1.0, np.abs(tiny.train.noisy).max())
    with pytest.raises(rtl.DataError, match="no dataset file"):
        load_noisy_speech(tmp_path / "none.npz")
    with pytest.raises(rtl.DataError, match="must end in .npz"):
        save_noisy_speech(tiny, tmp_path / "x.bin")
    with pytest.raises(rtl.DataError, match="SpeechData"):
        save_noisy_speech({"train": 1}, tmp_path / "x.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(rtl.CorruptFileError, match="unreadable"):
        load_noisy_speech(tmp_path / "bad.npz")
    import json
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["config"]["from_the_future"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(rtl.CorruptFileError, match="cannot read"):
        load_noisy_speech(tmp_path / "future.npz")


def test_mixed_route_retraining_runs_and_differs_from_the_sequential_schedule(tmp_path):
    _need_tools()
    from rtl_plugin.tasks.speech.runner import SpeechConfig, run_speech
    kw = dict(sparsities=(0.5,), cache=str(tmp_path / "cache"), **TINY, batch_size=6, baselines=(), router=False,
              figures=False)
    got = {}
    for mode in ("sequential", "mixed"):
        res = run_speech(SpeechConfig.quick(retrain_mode=mode, **kw), tmp_path / mode)
        assert res["config"]["retrain_mode"] == mode
        (row,) = res["rows"]
        assert (row["method"], row["routing"]) == ("rtl", "context") and math.isfinite(row["metrics"]["si_snri"])
        got[mode] = row["metrics"]["si_snri"]
    assert got["mixed"] != got["sequential"]  # same data, θ0 and masks: only the schedule differs
    with pytest.raises(rtl.DataError, match="retrain_mode"):
        run_speech(SpeechConfig.quick(retrain_mode="summed"), tmp_path / "x")


def test_run_speech_reads_a_data_file_and_checks_its_settings(tiny, tmp_path):
    from rtl_plugin.tasks.speech.data import save_noisy_speech
    from rtl_plugin.tasks.speech.runner import SpeechConfig, _load_or_build
    p = str(save_noisy_speech(tiny, tmp_path / "speech.npz"))
    c = tiny.config
    cfg = SpeechConfig.quick(train_per_env=c.train_per_env, test_per_env=c.test_per_env,
                             train_utterances=c.train_utterances, test_utterances=c.test_utterances,
                             babble_utterances=c.babble_utterances, clip_seconds=c.clip_seconds,
                             real_test_per_env=c.real_test_per_env, seed=c.seed, data_file=p)
    np.testing.assert_array_equal(_load_or_build(cfg).train.clean, tiny.train.clean)
    if c.real_corpora:  # a file with a real-speech split of another size
        with pytest.raises(rtl.DataError, match="real_test_per_env: file"):
            _load_or_build(SpeechConfig.quick(**{**cfg.__dict__, "real_test_per_env": c.real_test_per_env + 1}))
    with pytest.raises(rtl.DataError, match="seed: file 3 vs config 4"):
        _load_or_build(SpeechConfig.quick(**{**cfg.__dict__, "seed": 4}))
    with pytest.raises(rtl.DataError, match="data_file must be"):
        SpeechConfig.quick(data_file=3).validate()
    if tiny.config.real_noise:  # a file with real noise is not a synthetic-only dataset
        with pytest.raises(rtl.DataError, match="real_noise: file True vs config False"):
            _load_or_build(SpeechConfig.quick(**{**cfg.__dict__, "real_noise": False}))


def test_instance_noise_split_uses_every_type_with_unseen_instances():
    import hashlib
    import json
    from dataclasses import asdict
    for env in NOISE_SOURCES:
        tr, te = noise_sources(env, "train", split="instances"), noise_sources(env, "test", split="instances")
        real_tr, real_te = {x for x in tr if x.startswith("sp:")}, {x for x in te if x.startswith("sp:")}
        clips = REAL_NOISE_CLIPS[env]["train"] + REAL_NOISE_CLIPS[env]["test"]
        assert real_tr == {f"sp:{c}@train" for c in clips} and real_te == {f"sp:{c}@test" for c in clips}
        if any(t.startswith("babble") for t in NOISE_SOURCES[env]["train"]):  # babble: disjoint speaker pools
            assert "babble_train" in tr and "babble_test" in te and "babble_test" not in tr
        synth = [t for t in dict.fromkeys(NOISE_SOURCES[env]["train"] + NOISE_SOURCES[env]["test"])
                 if not t.startswith("babble")]
        assert [x for x in tr if x in synth] == [x for x in te if x in synth] == synth  # every type, both splits
    with pytest.raises(rtl.DataError, match="split must be"):
        noise_sources("indoor", "train", split="clips")
    with pytest.raises(rtl.DataError, match="noise_split"):
        SpeechDataConfig(noise_split="clips").validate()
    # the default leaves the key (and the cache files) of datasets built before the option existed unchanged
    cfg = SpeechDataConfig()
    d = {**asdict(cfg), "snr_db": list(cfg.snr_db), "environments": list(cfg.environments),
         "real_corpora": list(cfg.real_corpora), "version": speech.FORMAT_VERSION}
    del d["noise_split"]
    assert cfg.key() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.key() != SpeechDataConfig(noise_split="instances").key()


def test_instance_split_real_clip_parts_do_not_overlap(monkeypatch):
    """The train and test parts of a real clip are disjoint sample ranges; an unknown part is an error."""
    clip = np.arange(1000, dtype=np.float32)
    monkeypatch.setitem(speech._CLIP_CACHE, str(speech.Path(speech.SONIC_PI_DIR) / "fake.flac"), clip)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(speech, "_speech_crop", lambda x, n, rng: x[:n])
    tr = speech._real_noise("fake", 5000, rng, "train")
    te = speech._real_noise("fake", 5000, rng, "test")
    cut = int(round(speech.TRAIN_PART * 1000))
    assert set(np.abs(tr).astype(int)) <= set(range(cut)) and set(np.abs(te).astype(int)) <= set(range(cut, 1000))
    with pytest.raises(rtl.DataError, match="part must be"):
        speech._real_noise("fake", 10, rng, "tain")
