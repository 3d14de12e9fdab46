"""Renamed task config fields and benchmark flags: the old names still work for one version and warn."""
from __future__ import annotations

import argparse

import pytest

from rtl_plugin.errors import DataError
from rtl_plugin.tasks.classification.runner import ClassificationConfig
from rtl_plugin.tasks.inr import INRConfig
from rtl_plugin._deprecated import add_deprecated_flag
from rtl_plugin.tasks.segmentation import CompositionClusters, SegConfig
from rtl_plugin.tasks.speech.runner import SpeechConfig


@pytest.mark.parametrize("cls, old, new, value", [
    (ClassificationConfig, "search_epochs", "epochs_per_round", 3),
    (SpeechConfig, "search_epochs", "epochs_per_round", 3),
    (SpeechConfig, "rtl_retrain", "retrain_mode", "mixed"),
    (SegConfig, "search_epochs", "epochs_per_round", 3),
    (SegConfig, "n_clusters", "num_clusters", 3),
])
def test_old_config_field_names_warn_and_still_work(cls, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated.*use {new}="):
        cfg = cls(**{old: value})
    assert getattr(cfg, new) == value
    with pytest.warns(DeprecationWarning, match=f"use .{new}"):
        assert getattr(cfg, old) == value
    with pytest.raises(DataError, match=f"both {old}= and {new}="):
        cls(**{old: value, new: value})


def test_inr_summed_is_the_deprecated_name_of_mixed():
    with pytest.warns(DeprecationWarning, match='retrain_mode="mixed"'):
        cfg = INRConfig.quick(retrain_mode="summed")
    assert cfg.retrain_mode == "mixed"


def test_composition_clusters_old_argument_name():
    with pytest.warns(DeprecationWarning, match="n_clusters= is deprecated"):
        clusters = CompositionClusters(n_clusters=3, num_classes=4)
    assert clusters.num_clusters == 3


def test_deprecated_flag_is_an_alias_that_warns():
    p = argparse.ArgumentParser(prog="bench")
    p.add_argument("--epochs-per-round", type=int, default=None)
    add_deprecated_flag(p, "--search-epochs", "--epochs-per-round", type=int)
    assert p.parse_args([]).epochs_per_round is None
    assert p.parse_args(["--epochs-per-round", "2"]).epochs_per_round == 2
    with pytest.warns(DeprecationWarning, match="--search-epochs is deprecated.*use --epochs-per-round"):
        assert p.parse_args(["--search-epochs", "4"]).epochs_per_round == 4


def test_run_classification_cfg_keyword_is_deprecated(monkeypatch, tmp_path):
    from rtl_plugin.tasks.classification import runner
    seen = {}
    monkeypatch.setattr(runner, "compare", lambda task, config, out_dir: seen.setdefault("cfg", task.cfg))
    monkeypatch.setattr(runner, "ClassificationTask", lambda cfg, out_dir: type("T", (), {"cfg": cfg})())
    cfg = ClassificationConfig.quick()
    with pytest.warns(DeprecationWarning, match=r"run_classification\(config, out_dir\)"):
        runner.run_classification(cfg=cfg, out_dir=tmp_path)
    assert seen["cfg"] is cfg
    with pytest.raises(DataError, match="both config and cfg"):
        runner.run_classification(cfg, tmp_path, cfg=cfg)
    with pytest.raises(DataError, match="ClassificationConfig"):
        runner.run_classification({"model": "timm:test_resnet"}, tmp_path)
