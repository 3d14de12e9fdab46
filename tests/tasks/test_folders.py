"""The user's own images: ImageFolder trees, contexts tables, image + mask folders and timm checkpoints, on real
image files written from offline sources (UCI digits, MNIST, scikit-image photos)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from _image_folders import DIGITS, contexts_csv, write_digit_folder, write_mask_folder
from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, DataError
from rtl_plugin.tasks.classification.checkpoints import create_from_checkpoint, inspect_checkpoint
from rtl_plugin.tasks.classification.runner import folder_transform
from rtl_plugin.tasks.folders import (load_image_folder, load_mask_folder, read_contexts, scan_image_folder,
                                      split_holdout)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("img") / "digits", per_class=4)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return write_mask_folder(tmp_path_factory.mktemp("seg") / "seg", n=8)


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    shutil.copy(contexts_csv(src), contexts_csv(dst))
    return dst


def _load(root, **kw):
    transform, size = folder_transform("timm:test_resnet", 16)
    return load_image_folder(root, transform=transform, image_size=size, log=lambda m: None, **kw)


def test_scan_finds_classes_files_and_ignores_hidden(digits, tmp_path):
    root = _copy(digits, tmp_path)
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "0" / "notes.txt").write_text("not an image")
    scan = scan_image_folder(root)
    assert scan.class_names == list(DIGITS) and len(scan) == 3 * 8
    assert all(f.split("/")[0] == scan.class_names[y] for f, y in zip(scan.files, scan.labels))


def test_loaded_images_follow_timm_data_config_and_contexts(digits):
    data = _load(digits, contexts=contexts_csv(digits), seed=0)
    tr, te = data.train, data.test
    assert tr.x.shape[1:] == (3, 16, 16) and tr.x.dtype == torch.float32
    assert tr.domain_names == ["mnist", "uci"] and tr.class_names == list(DIGITS)
    assert len(tr) + len(te) == 24 and len(te) == 6  # 25% of every (context, class) pair of 4 images
    # test_resnet's data config normalises with mean 0.5 / std 0.5: pixels in [0, 1] map to [-1, 1]
    assert float(tr.x.min()) >= -1.0001 and float(tr.x.max()) <= 1.0001 and float(tr.x.min()) < -0.9
    for files, ds in ((data.train_files, tr), (data.test_files, te)):
        for f, y, d in zip(files, ds.y.tolist(), ds.domain.tolist()):
            assert f.split("/")[0] == DIGITS[y] and f.split("/")[1].startswith(ds.domain_names[d])
    assert not set(data.train_files) & set(data.test_files)
    again = _load(digits, contexts=contexts_csv(digits), seed=0)
    assert again.test_files == data.test_files and torch.equal(again.train.x, tr.x)
    assert _load(digits, contexts=contexts_csv(digits), seed=1).test_files != data.test_files


def test_val_folder_and_cap_per_context(digits, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(digits, val)
    shutil.rmtree(val / "7")  # a validation folder may lack a class; it keeps the training class ids
    data = _load(digits, val_dir=val, max_per_context=9)
    assert len(data.train) == 9 and len(data.test) == 9 and data.train.domain_names == ["all"]
    assert sorted(set(data.train.y.tolist())) == [0, 1, 2]  # the cap is stratified by class
    assert data.notes and "9 of 24" in data.notes[0]
    (val / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(val / "dog" / "a.png")
    with pytest.raises(DataError, match="dog"):
        _load(digits, val_dir=val)


@pytest.mark.parametrize("make,needle", [
    (lambda r: [shutil.rmtree(p) for p in r.iterdir()], "no class sub folders"),
    (lambda r: [p.unlink() for p in r.rglob("*.*")], "holds no image"),
    (lambda r: [shutil.rmtree(r / c) for c in DIGITS[1:]], "single class"),
])
def test_bad_folders_name_the_fix(digits, tmp_path, make, needle):
    root = _copy(digits, tmp_path)
    make(root)
    with pytest.raises(DataError, match=needle):
        _load(root)
    with pytest.raises(DataError, match="is not a folder"):
        _load(tmp_path / "nowhere")


def test_unreadable_images_are_skipped_with_a_count_or_refused(digits, tmp_path):
    root = _copy(digits, tmp_path)
    (root / "1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "7" / "empty.png").write_bytes(b"")
    logged = []
    transform, size = folder_transform("timm:test_resnet", 16)
    data = load_image_folder(root, transform=transform, image_size=size, log=logged.append)
    assert len(data.skipped) == 2 and len(data.train) + len(data.test) == 24
    assert any("skipped 2 unreadable" in m for m in logged)
    with pytest.raises(DataError, match="2 of .* cannot be read.*--unreadable skip"):
        _load(root, unreadable="error")


def test_contexts_file_errors(digits, tmp_path):
    root = _copy(digits, tmp_path)
    csv = contexts_csv(root)
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-2]) + "\n")  # two images lose their row
    with pytest.raises(DataError, match="no row for 2 images"):
        _load(root, contexts=csv)
    csv.write_text("\n".join(lines + ["9/ghost.png,uci"]) + "\n")
    with pytest.raises(DataError, match="names 1 files that are not images"):
        _load(root, contexts=csv)
    csv.write_text("\n".join(lines + [lines[1].split(",")[0] + ",other"]) + "\n")
    with pytest.raises(DataError, match="two contexts"):
        _load(root, contexts=csv)
    with pytest.raises(DataError, match="does not exist"):
        _load(root, contexts=tmp_path / "missing.csv")
    # no header, Windows separators, ./ prefixes: the same table
    csv.write_text("\n".join("." + "\\" + ln.replace("/", "\\") for ln in lines[1:]) + "\n")
    scan = scan_image_folder(root)
    assert read_contexts(csv, [scan])[0] == [ln.split(",")[1] for ln in sorted(lines[1:])]


def test_split_holdout_is_stratified_and_seeded():
    strata = np.repeat(np.arange(3), [10, 4, 1])
    tr, te = split_holdout(strata, 0.25, 0)
    assert sorted(np.bincount(strata[te], minlength=3)) == [0, 1, 2] and 14 not in te
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(15))
    assert np.array_equal(split_holdout(strata, 0.25, 0)[1], te)
    with pytest.raises(DataError, match="--val-data"):
        split_holdout(np.arange(3), 0.25, 0)


def test_mask_folder_reads_class_maps(masks):
    train, test, notes = load_mask_folder(masks, size=32, seed=0, log=lambda m: None)
    assert train.classes == ("brick", "grass", "coffee") and len(train) == 6 and len(test) == 2
    assert train.images.shape == (6, 3, 32, 32) and 0 <= float(train.images.min()) <= float(train.images.max()) <= 1
    assert train.labels.dtype == torch.int64 and set(train.labels.unique().tolist()) <= {0, 1, 2}
    from rtl_plugin.tasks.segmentation import make_seg_mosaic
    i = int(train.files[0].split("_")[1].split(".")[0])
    assert torch.equal(train.labels[0], make_seg_mosaic(i, train.classes, n_regions=2, size=32)[1])
    assert all(k in train.labels[j] for k in range(3) for j in train.contains(k).tolist())


def test_mask_folder_errors(masks, tmp_path):
    root = tmp_path / "seg"
    shutil.copytree(masks, root)
    (root / "masks" / "m_000.png").unlink()
    with pytest.raises(DataError, match="1 images without a mask"):
        load_mask_folder(root, size=32)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "masks" / "m_000.png")
    with pytest.raises(DataError, match="mode RGB"):
        load_mask_folder(root, size=32, unreadable="error")
    Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(root / "masks" / "m_000.png")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="void label like 255"):
        load_mask_folder(root, size=32)
    with pytest.raises(DataError, match="images/ and masks/"):
        load_mask_folder(root / "images", size=32)


def test_checkpoint_keeps_or_resets_the_classifier(tmp_path):
    src = timm.create_model("test_resnet", num_classes=5)
    safetensors.torch.save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        info = inspect_checkpoint("test_resnet", tmp_path / f)
        assert info.num_classes == 5 and info.classifier == "fc"
        same = create_from_checkpoint("test_resnet", info, num_classes=5)
        assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
        other = create_from_checkpoint("test_resnet", info, num_classes=3, seed=4)
        assert other.fc.weight.shape == (3, src.fc.in_features)
        assert torch.equal(other.conv1[0].weight, src.conv1[0].weight)
        assert torch.equal(other.fc.weight, create_from_checkpoint("test_resnet", info, num_classes=3, seed=4).fc.weight)
        assert "reset from 5 to the data's 3" in info.head_message(3)


def test_checkpoint_errors(tmp_path):
    src = timm.create_model("test_resnet", num_classes=5)
    safetensors.torch.save_file(src.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="another architecture"):
        create_from_checkpoint("test_efficientnet", inspect_checkpoint("test_efficientnet", tmp_path / "w.safetensors"),
                               num_classes=3)
    torch.save({"model": src}, tmp_path / "pickled.pth")  # a whole pickled module is not weights
    with pytest.raises(CorruptFileError, match="state_dict"):
        inspect_checkpoint("test_resnet", tmp_path / "pickled.pth")
    with pytest.raises(DataError, match="does not exist"):
        inspect_checkpoint("test_resnet", tmp_path / "none.safetensors")
    head_less = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    safetensors.torch.save_file(head_less, tmp_path / "bb.safetensors")
    info = inspect_checkpoint("test_resnet", tmp_path / "bb.safetensors")
    assert info.num_classes is None and "no classifier" in info.head_message(3)
    assert torch.equal(create_from_checkpoint("test_resnet", info, num_classes=3).conv1[0].weight,
                       src.conv1[0].weight)
    del head_less["layer1.0.conv1.weight"]
    safetensors.torch.save_file(head_less, tmp_path / "bb2.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="lacks 1 tensors"):
        create_from_checkpoint("test_resnet", inspect_checkpoint("test_resnet", tmp_path / "bb2.safetensors"),
                               num_classes=3)


def test_folder_transform_defaults_to_the_models_own_input_size():
    transform, size = folder_transform("timm:test_resnet", None)
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert size == cfg.input_size[-1]
    x = transform(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, size, size)
    assert torch.allclose(x[0], torch.full((size, size), (1 - cfg.mean[0]) / cfg.std[0]), atol=1e-5)
