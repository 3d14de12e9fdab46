"""Save / load of a RoutedModel: exact round trip, manifest, no pickle, atomic writes, corruption handling."""

import hashlib
import json
import os
import pathlib
import pickle

import pytest
import torch

import rtl_plugin as rtl
import rtl_plugin.persist.io as rio
from rtl_plugin.space import architecture_fingerprint

GRANULARITIES = ["weight", "channel"]
FILES = {rio.MANIFEST, rio.WEIGHTS, rio.MASKS}


def _train_stats(routed, seed: int = 0) -> None:
    """Move the routed BN statistics away from their init, differently per ticket."""
    g = torch.Generator().manual_seed(seed)
    routed.train()
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(6, 3, 8, 8, generator=g)
            x[1::3] *= 3.0
            x[2::3] += 2.0
            routed(x, route=torch.tensor([0, 1, 2, 0, 1, 2]))
            routed(x[:2], route=step % 3)
    routed.eval()


def _bn_stats(routed) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in routed.model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.fixture(scope="module", params=GRANULARITIES)
def saved(request, make_routed, tmp_path_factory):
    """(routed, folder): a routed TinyCNN with trained per-ticket BN statistics, saved."""
    routed = make_routed(request.param, num_tickets=3, keep=0.5, seed=1)
    _train_stats(routed)
    folder = tmp_path_factory.mktemp(f"run_{request.param}")
    assert routed.save(folder) == folder
    return routed, folder


def _copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_manifest(folder: pathlib.Path, fn) -> None:
    mf = folder / rio.MANIFEST
    m = json.loads(mf.read_text())
    fn(m)
    mf.write_text(json.dumps(m))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_outputs_exact(saved, make_tiny):
    routed, folder = saved
    loaded = rtl.load(folder, make_tiny(seed=123))  # different init: every weight must come from the file
    assert isinstance(loaded, rtl.RoutedModel)
    assert loaded.granularity == routed.granularity and loaded.num_tickets == 3
    assert loaded.space.to_dict() == routed.space.to_dict()
    loaded.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 8, 8, generator=g)
    with torch.no_grad():
        for route in (torch.tensor([2, 0, 1, 1, 0, 2, 2]), torch.tensor([1] * 7), 0, 2):
            assert torch.equal(loaded(x, route=route), routed(x, route=route)), route
    sd_a, sd_b = routed.model.state_dict(), loaded.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_routed_bn_statistics_survive(saved, make_tiny):
    routed, folder = saved
    before = _bn_stats(routed)
    assert before, "the tiny CNN has routed BatchNorms"
    for k, v in before.items():
        if k.endswith("running_mean"):
            assert v.shape[0] == 3
            assert not torch.equal(v, torch.zeros_like(v)), "training moved the statistics"
            assert not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2]), "per-ticket statistics differ"
    after = _bn_stats(rtl.load(folder, make_tiny(seed=9)))
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_channel_export_after_load_matches(make_routed, make_tiny, tmp_path):
    routed = make_routed("channel", num_tickets=3, seed=4)
    _train_stats(routed)
    routed.save(tmp_path)
    loaded = rtl.load(tmp_path, make_tiny(seed=77))
    x = torch.randn(3, 3, 8, 8)
    for k in range(3):
        a, b = rtl.export_ticket(routed, k).eval(), rtl.export_ticket(loaded, k).eval()
        with torch.no_grad():
            assert torch.equal(a(x), b(x))


def test_load_tickets_equal_masks(saved):
    routed, folder = saved
    ts = rio.load_tickets(folder)
    assert isinstance(ts, rtl.TicketSet)
    assert ts.num_tickets == routed.num_tickets and ts.granularity == routed.granularity
    assert ts.masks.keys() == routed.tickets.masks.keys()
    for k, m in routed.tickets.masks.items():
        assert ts.masks[k].dtype == torch.bool
        assert torch.equal(ts.masks[k], m.cpu()), k
    assert torch.equal(ts.kept(), routed.tickets.kept().cpu())


# ----------------------------------------------------------------------------- manifest and file formats


def test_manifest_contents(saved):
    routed, folder = saved
    m = rio.read_manifest(folder)
    assert m == json.loads((folder / rio.MANIFEST).read_text())
    assert m["format"] == "rtl-plugin"
    assert m["format_version"] == rio.FORMAT_VERSION == 1
    assert m["fingerprint"] == routed.space.fingerprint == architecture_fingerprint(routed.model)
    assert m["granularity"] == routed.granularity
    assert m["num_tickets"] == 3
    assert m["shared_norm"] is False
    assert m["space"] == json.loads(routed.space.to_json())
    assert m["mask_shapes"] == {k: list(s) for k, s in routed.space.mask_shapes().items()}
    assert set(m["files"]) == {rio.WEIGHTS, rio.MASKS}
    for name, digest in m["files"].items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    assert m["sparsity"] == pytest.approx(routed.tickets.sparsity().tolist(), abs=1e-6)


def test_extra_metadata_saved(make_routed, tmp_path):
    make_routed("weight").save(tmp_path, extra={"dataset": "cifar10", "epochs": 3})
    assert rio.read_manifest(tmp_path)["extra"] == {"dataset": "cifar10", "epochs": 3}


def test_every_file_is_json_or_safetensors(saved):
    from safetensors import safe_open
    _, folder = saved
    names = {f.name for f in folder.iterdir()}
    assert names == FILES
    for f in folder.iterdir():
        head = f.read_bytes()[:2]
        assert not head.startswith(b"\x80") and head != b"PK", f"{f.name} looks like a pickle / torch zip"
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors", f.name
            with safe_open(str(f), framework="pt") as st:
                assert list(st.keys())


class _Evil:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_in_folder_is_never_executed(saved, make_tiny, tmp_path):
    _, src = saved
    # the payload works: unpickling it does create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()

    folder = _copy_run(src, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    for name in ("evil.pkl", "weights.pkl", "model.pt", "pytorch_model.bin", "masks.pkl"):
        (folder / name).write_bytes(payload)
    torch.save({"x": _Evil(marker)}, folder / "weights.pth")
    rtl.load(folder, make_tiny())
    rio.load_tickets(folder)
    assert not marker.exists()

    # a pickle posing as the weights file, with a matching checksum: rejected, not unpickled
    for name, blob in ((rio.WEIGHTS, payload), (rio.MASKS, payload), (rio.WEIGHTS, (folder / "weights.pth").read_bytes())):
        bad = _copy_run(src, tmp_path / f"bad_{name}_{len(blob)}")
        (bad / name).write_bytes(blob)
        _edit_manifest(bad, lambda m: m["files"].__setitem__(name, hashlib.sha256(blob).hexdigest()))
        with pytest.raises(rtl.CorruptFileError, match="not a valid safetensors file"):
            rtl.load(bad, make_tiny())
        assert not marker.exists()


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_no_temp_files(make_routed, tmp_path):
    routed = make_routed("weight")
    for _ in range(2):  # overwriting a run folder too
        routed.save(tmp_path)
        assert {f.name for f in tmp_path.iterdir()} == FILES
    rio.atomic_write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["x.json"]


@pytest.mark.parametrize("fail_in", ["replace", "fsync"])
def test_failed_save_keeps_previous_run(make_routed, make_tiny, tmp_path, monkeypatch, fail_in):
    first = make_routed("weight", seed=1)
    first.eval()
    first.save(tmp_path)
    snapshot = {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    second = make_routed("weight", seed=2)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, fail_in, boom)
    with pytest.raises(OSError, match="simulated"):
        second.save(tmp_path)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == snapshot  # no temp files, nothing replaced
    loaded = rtl.load(tmp_path, make_tiny()).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, route=torch.tensor([0, 1, 2])), first(x, route=torch.tensor([0, 1, 2])))


# ----------------------------------------------------------------------------- wrong architecture


@pytest.mark.parametrize("other", [dict(width=4), dict(num_classes=7)], ids=["width", "num_classes"])
def test_load_into_other_tiny_cnn(saved, make_tiny, other):
    _, folder = saved
    with pytest.raises(rtl.ArchitectureMismatchError, match="another architecture"):
        rtl.load(folder, make_tiny(**other))


def test_load_resnet18_other_num_classes(tmp_path):
    import timm
    routed = rtl.wrap(timm.create_model("resnet18", num_classes=4), 2, example_inputs=torch.randn(1, 3, 32, 32))
    routed.set_tickets(rtl.TicketSet.random(routed.space, 2, keep=0.5, seed=0))
    routed.eval()
    routed.save(tmp_path)
    with pytest.raises(rtl.ArchitectureMismatchError, match="fingerprint"):
        rtl.load(tmp_path, timm.create_model("resnet18", num_classes=5))
    with pytest.raises(rtl.ArchitectureMismatchError):
        rtl.load(tmp_path, timm.create_model("resnet34", num_classes=4))
    loaded = rtl.load(tmp_path, timm.create_model("resnet18", num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, route=torch.tensor([1, 0])), routed(x, route=torch.tensor([1, 0])))


# ----------------------------------------------------------------------------- corrupt folders


def _truncate(f: pathlib.Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip(f: pathlib.Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) - 3] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate_keep_checksum(folder: pathlib.Path, name: str) -> None:
    f = folder / name
    data = f.read_bytes()[:-5]
    f.write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"].__setitem__(name, hashlib.sha256(data).hexdigest()))


# (id, damage, substring of the message, does load_tickets() (manifest + masks only) see it too)
CORRUPTIONS = [
    ("truncated_weights", lambda d: _truncate(d / rio.WEIGHTS), "checksum", False),
    ("truncated_masks", lambda d: _truncate(d / rio.MASKS), "checksum", True),
    ("flipped_byte_masks", lambda d: _flip(d / rio.MASKS), "checksum", True),
    ("flipped_byte_weights", lambda d: _flip(d / rio.WEIGHTS), "checksum", False),
    ("empty_weights", lambda d: (d / rio.WEIGHTS).write_bytes(b""), "checksum", False),
    ("invalid_json_manifest", lambda d: (d / rio.MANIFEST).write_text('{"format": "rtl-plugin", '), "not valid JSON",
     True),
    ("binary_manifest", lambda d: (d / rio.MANIFEST).write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON", True),
    ("foreign_manifest", lambda d: (d / rio.MANIFEST).write_text('{"format": "other"}'), "not an rtl-plugin manifest",
     True),
    ("list_manifest", lambda d: (d / rio.MANIFEST).write_text("[1, 2]"), "not an rtl-plugin manifest", True),
    ("no_format_version", lambda d: _edit_manifest(d, lambda m: m.pop("format_version")), "format_version", True),
    ("missing_manifest", lambda d: (d / rio.MANIFEST).unlink(), "does not exist", True),
    ("missing_weights", lambda d: (d / rio.WEIGHTS).unlink(), "missing", False),
    ("missing_masks", lambda d: (d / rio.MASKS).unlink(), "missing", True),
    ("unparsable_weights_matching_checksum", lambda d: _truncate_keep_checksum(d, rio.WEIGHTS), "safetensors", False),
    ("unparsable_masks_matching_checksum", lambda d: _truncate_keep_checksum(d, rio.MASKS), "safetensors", True),
]


@pytest.mark.parametrize("damage, hint, tickets_too", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_folder_raises(saved, make_tiny, tmp_path, damage, hint, tickets_too):
    _, src = saved
    folder = _copy_run(src, tmp_path / "run")
    damage(folder)
    with pytest.raises(rtl.CorruptFileError, match=hint) as ei:
        rtl.load(folder, make_tiny())
    assert isinstance(ei.value, rtl.RTLError) and isinstance(ei.value, OSError)
    if tickets_too:
        with pytest.raises(rtl.CorruptFileError, match=hint):
            rio.load_tickets(folder)
    else:
        rio.load_tickets(folder)  # the masks are intact


def test_load_from_missing_folder(make_tiny, tmp_path):
    with pytest.raises(rtl.CorruptFileError, match="not a saved rtl-plugin model"):
        rtl.load(tmp_path / "nope", make_tiny())


def test_newer_format_version(saved, make_tiny, tmp_path):
    _, src = saved
    folder = _copy_run(src, tmp_path / "run")
    _edit_manifest(folder, lambda m: m.__setitem__("format_version", 999))
    for fn in (lambda: rtl.load(folder, make_tiny()), lambda: rio.load_tickets(folder), lambda: rio.read_manifest(folder)):
        with pytest.raises(rtl.FormatVersionError, match="upgrade rtl-plugin") as ei:
            fn()
        assert "999" in str(ei.value)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m.pop("space"), id="no_space"),
    pytest.param(lambda m: m.pop("num_tickets"), id="no_num_tickets"),
    pytest.param(lambda m: m.__setitem__("files", []), id="files_not_a_dict"),
])
def test_incomplete_manifest_is_corrupt(saved, make_tiny, tmp_path, edit):
    _, src = saved
    folder = _copy_run(src, tmp_path / "run")
    _edit_manifest(folder, edit)
    with pytest.raises(rtl.CorruptFileError):
        rtl.load(folder, make_tiny())
