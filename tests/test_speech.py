"""The offline noisy-speech builder (rtl_plugin.speech) and the speech-enhancement pipeline (issue #6)."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

import rtl_plugin as rtl
from rtl_plugin import speech
from rtl_plugin.speech import NOISE_SOURCES, SpeechDataConfig, build_noisy_speech, mix_at_snr, snr_db

TINY = dict(train_per_env=4, test_per_env=3, train_utterances=4, test_utterances=3, babble_utterances=4)


def _need_tools():
    try:
        speech.check_tools()
    except rtl.MissingDependencyError:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng/sox missing in CI: .ci/run must install the Debian packages espeak-ng sox flite")
        pytest.skip("espeak-ng/sox missing: apt-get install espeak-ng sox (CI installs them and requires this test)")


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
        assert tr <= set(NOISE_SOURCES[env]["train"]) and te <= set(NOISE_SOURCES[env]["test"])
        assert tr and te and not tr & te  # test noise is unseen


def test_builder_is_deterministic_in_the_seed(tiny, tmp_path):
    again = build_noisy_speech(SpeechDataConfig(**TINY, seed=3), use_cache=False)
    for a, b in ((tiny.train, again.train), (tiny.test, again.test)):
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
    from rtl_plugin.speech_experiment import SpeechConfig, router_features, run_speech
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
    assert all(os.path.exists(p) for p in res["figures"])
    with pytest.raises(rtl.DataError, match="router_features"):
        router_features(torch.zeros(2, 100))
    with pytest.raises(rtl.SparsityError, match="sparsities"):
        run_speech(SpeechConfig.quick(sparsities=(0.5, 0.25)), tmp_path / "x")


def test_without_flite_builds_espeak_only_under_its_own_cache_key(tiny, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(speech.shutil, "which", lambda name, *a, **k: None if name == "flite" else real(name, *a, **k))
    data = build_noisy_speech(SpeechDataConfig(**TINY, seed=3), cache=tiny.path.parent.parent)
    assert data.config.use_flite is False and np.isfinite(data.train.noisy).all()
    if real("flite") is not None:  # flite changes the speech, so it must not share the cached file
        assert data.path != tiny.path
        assert not np.array_equal(data.train.clean, tiny.train.clean)
