"""The one manifest reader/writer/validator (rtl_plugin.persist.manifest), and files written before it existed."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rtl_plugin as rtl
from rtl_plugin.persist import manifest as M
from rtl_plugin.persist.checkpoint import load_bundle
from rtl_plugin.persist.io import load_tickets
from rtl_plugin.persist.package import load_package
from _helpers import TinyCNN

V1 = Path(__file__).parent / "data" / "v1"  # written by commit 37e7b22 (data/make_v1_files.py), format version 1


def _fresh() -> TinyCNN:
    torch.manual_seed(123)  # another init than the saved model: every weight must come from the files
    return TinyCNN()


# ----------------------------------------------------------------------------- files of the previous code
@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_v1_model_folder_still_loads(gran):
    want = load_file(str(V1 / "expected.safetensors"))
    routed = rtl.load(V1 / f"model_{gran}", _fresh()).eval()
    with torch.no_grad():
        assert torch.equal(routed(want["x"], route=want["route"]), want[f"y_{gran}"])
    assert load_tickets(V1 / f"model_{gran}").num_tickets == 3
    assert M.read_manifest(V1 / f"model_{gran}" / "manifest.json", M.MODEL)["extra"] == {"note": "v1"}


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_v1_package_still_loads(gran):
    want = load_file(str(V1 / "expected.safetensors"))
    slim = load_package(V1 / f"package_{gran}", _fresh())
    with torch.no_grad():
        y = slim(want["x"], route=want["route"])
        assert torch.allclose(y, want[f"y_{gran}"], rtol=1e-4, atol=1e-5)
        assert slim.router is not None and slim(want["x"]).shape == y.shape  # the packaged centroid router


def test_v1_checkpoint_still_loads():
    tensors, meta = load_bundle(V1 / "checkpoint", "search", config={"c": 1})
    assert meta == {"epoch": 3} and torch.equal(tensors["a"], torch.arange(4))


# ----------------------------------------------------------------------------- one schema per kind
def test_write_then_read_roundtrip(tmp_path):
    body = {"kind": "x", "config": {"a": 1}, "config_sha256": "0", "meta": {}, "meta_sha256": "0",
            "tensors": {"file": "x.safetensors"}}
    written = M.write_manifest(tmp_path / "x.json", M.CHECKPOINT, body)
    read = M.read_manifest(tmp_path / "x.json", M.CHECKPOINT, expect={"kind": "x"})
    assert read == written and read["format"] == "rtl-plugin-checkpoint" and read["format_version"] == 1
    assert read["rtl_plugin_version"] == rtl.__version__
    with pytest.raises(rtl.CorruptFileError, match="kind='x', not 'y'"):
        M.read_manifest(tmp_path / "x.json", M.CHECKPOINT, expect={"kind": "y"})


def test_writer_refuses_what_no_reader_accepts(tmp_path):
    with pytest.raises(rtl.CorruptFileError, match="'fingerprint'.*pass every key"):
        M.write_manifest(tmp_path / "m.json", M.MODEL, {"space": {}, "num_tickets": 2, "files": {},
                                                        "granularity": "weight"})
    with pytest.raises(rtl.CorruptFileError, match="stamps itself"):
        M.write_manifest(tmp_path / "m.json", M.MODEL, {"format": "mine"})
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("kind", M.KINDS, ids=lambda k: k.format)
def test_every_required_key_is_checked(tmp_path, kind):
    good = {"kind": "x", "config": {}, "config_sha256": "", "meta": {}, "meta_sha256": "", "tensors": {},
            "fingerprint": "f", "space": {}, "num_tickets": 2, "files": {}, "granularity": "weight", "tickets": []}
    body = {k: good[k] for k in kind.required}
    M.write_manifest(tmp_path / "ok.json", kind, body)
    assert M.read_manifest(tmp_path / "ok.json", kind)["format"] == kind.format
    for key in kind.required:
        for bad in (None, True, 1.5):  # missing, a bool posing as an int, another type
            m = {"format": kind.format, "format_version": kind.version, **body}
            if bad is None:
                m.pop(key)
            else:
                m[key] = bad
            (tmp_path / "bad.json").write_text(json.dumps(m))
            with pytest.raises(rtl.CorruptFileError, match=f"{key}.*{kind.fix.split(' (')[0]}"):
                M.read_manifest(tmp_path / "bad.json", kind)


def test_versions_and_foreign_formats(tmp_path):
    f = tmp_path / "manifest.json"
    for ver, err, needle in ((M.PACKAGE.version + 1, rtl.FormatVersionError, "upgrade rtl-plugin"),
                             (0, rtl.CorruptFileError, "format_version"), ("1", rtl.CorruptFileError, "format_version"),
                             (True, rtl.CorruptFileError, "format_version")):
        f.write_text(json.dumps({"format": "rtl-plugin-package", "format_version": ver}))
        with pytest.raises(err, match=needle):
            M.read_manifest(f, M.PACKAGE)
    f.write_text(json.dumps({"format": "rtl-plugin-checkpoint", "format_version": 1}))
    with pytest.raises(rtl.CorruptFileError, match="an rtl-plugin checkpoint: it resumes through checkpoint_dir"):
        M.read_manifest(f, M.MODEL)
    with pytest.raises(rtl.CorruptFileError, match="does not exist.*not a saved rtl-plugin model"):
        M.read_manifest(tmp_path / "none.json", M.MODEL)


def test_verified_reads_and_no_pickle(tmp_path):
    data = M.tensors_to_bytes({"w": torch.arange(6.0).reshape(2, 3)})
    (tmp_path / "t.safetensors").write_bytes(data)
    assert M.read_verified(tmp_path / "t.safetensors", M.sha256(data), M.PACKAGE) == data
    with pytest.raises(rtl.CorruptFileError, match="checksum.*re-export the package"):
        M.read_verified(tmp_path / "t.safetensors", M.sha256(data[:-1]), M.PACKAGE)
    with pytest.raises(rtl.CorruptFileError, match="missing.*re-save the model"):
        M.read_verified(tmp_path / "gone.safetensors", M.sha256(data), M.MODEL)
    assert torch.equal(M.tensors_from_bytes(data, "t", M.MODEL)["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(rtl.CorruptFileError, match="not a valid safetensors file"):
        M.tensors_from_bytes(pickle.dumps({"w": [1, 2]}), "p.pkl", M.MODEL)


def test_fingerprint_check(tmp_path):
    shutil.copytree(V1 / "model_weight", tmp_path / "m")
    manifest = M.read_manifest(tmp_path / "m" / "manifest.json", M.MODEL)
    M.check_fingerprint(_fresh(), manifest, tmp_path / "m", M.MODEL)
    with pytest.raises(rtl.ArchitectureMismatchError, match="another architecture.*create the same model"):
        M.check_fingerprint(TinyCNN(width=4), manifest, tmp_path / "m", M.MODEL)
