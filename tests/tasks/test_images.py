"""Real annotated photos (imgaug quokka, stardist nuclei) and Fashion-MNIST canvases (rtl_plugin.tasks.images)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import skimage  # noqa: F401  ([test] extra: a missing one fails)

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.tasks import images as images  # noqa: E402
from rtl_plugin.errors import DataError  # noqa: E402
from rtl_plugin.tasks.images import WHEELS_HINT, load_nuclei, load_quokka, make_fashion_canvas  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _need_wheel(name: str):
    if importlib.util.find_spec(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"the {name} wheel is missing in CI: .ci/run must run: {WHEELS_HINT}")
        pytest.skip(f"the {name} wheel is not installed: {WHEELS_HINT} (CI installs it and requires this test)")


def _need_fashion():
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file() and not (FASHION / "t10k-images-idx3-ubyte").is_file():
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST is missing in CI: .ci/run must run: apt-get install -y dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist (CI requires this test)")


def _check_pair(img, reg, size, n_regions):
    assert img.shape == (3, size, size) and img.dtype == torch.float32
    assert reg.shape == (size, size) and reg.dtype == torch.long
    assert bool(torch.isfinite(img).all()) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert float(img.max()) - float(img.min()) > 0.5  # a real picture, not a flat canvas
    assert reg.unique().tolist() == list(range(n_regions))


# --------------------------------------------------------------------------- quokka

def test_quokka_image_and_polygon_region_map():
    _need_wheel("imgaug")
    img, reg, mask = load_quokka(64, return_mask=True)
    _check_pair(img, reg, 64, 2)
    assert mask.shape == (643, 643) and mask.dtype == bool
    frac = float(reg.float().mean())
    assert 0.3 < frac < 0.55, frac  # the quokka fills about 40% of imgaug's square crop
    assert abs(frac - mask.mean()) < 0.02  # the resized map keeps the annotated area
    # the polygon is the animal: its bounding box (x 148..550, y 50..642 in the 643x643 crop) holds the region
    ys, xs = np.nonzero(mask)
    assert 140 <= xs.min() <= 160 and 540 <= xs.max() <= 552 and 45 <= ys.min() <= 60 and ys.max() >= 630
    assert int(reg[:, :8].sum()) == 0 and int(reg[:3].sum()) == 0  # left edge and top rows are background
    img2, reg2 = load_quokka(64)
    assert torch.equal(img, img2) and torch.equal(reg, reg2)  # deterministic
    img3, reg3 = load_quokka(32)
    _check_pair(img3, reg3, 32, 2)
    assert abs(float(reg3.float().mean()) - frac) < 0.03  # consistent across sizes


def test_nuclei_image_and_instance_mask():
    _need_wheel("stardist")
    img, reg, inst = load_nuclei(64, return_mask=True)
    _check_pair(img, reg, 64, 2)
    assert inst.shape == (512, 512) and int(inst.max()) > 100  # 183 labelled nuclei
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grey on 3 channels
    frac = float(reg.float().mean())
    assert 0.1 < frac < 0.3 and abs(frac - float((inst > 0).mean())) < 0.03
    # nuclei are bright: their mean intensity is well above the background's
    assert float(img[0][reg == 1].mean()) > float(img[0][reg == 0].mean()) + 0.1
    img2, reg2 = load_nuclei(64)
    assert torch.equal(img, img2) and torch.equal(reg, reg2)


@pytest.mark.parametrize("loader, package", [(load_quokka, "imgaug"), (load_nuclei, "stardist")])
def test_missing_wheel_is_a_clear_error(monkeypatch, loader, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == package else real(name, *a, **k))
    with pytest.raises(rtl.MissingDependencyError, match=r"pip install --no-deps imgaug==0\.4\.0 stardist==0\.9\.2"):
        loader(32)


def test_missing_file_in_wheel_is_a_clear_error(monkeypatch, tmp_path):
    class Spec:
        origin = str(tmp_path / "__init__.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: Spec() if name == "imgaug" else real(name, *a, **k))
    with pytest.raises(rtl.MissingDependencyError, match="quokka.jpg is missing"):
        load_quokka(32)


@pytest.mark.parametrize("size", [8, 2000, 64.0, True, "64"])
def test_real_photo_bad_size(size):
    for loader in (load_quokka, load_nuclei):
        with pytest.raises(DataError, match="size"):
            loader(size)


def test_real_photos_are_not_imported():
    import sys
    for name in ("imgaug", "stardist"):
        if importlib.util.find_spec(name) is not None and name not in sys.modules:  # (imported elsewhere: moot)
            (load_quokka if name == "imgaug" else load_nuclei)(16)
            assert name not in sys.modules, f"{name} must be read, not imported"


# --------------------------------------------------------------------------- Fashion-MNIST canvases

def test_fashion_canvas_regions_and_determinism(tmp_path):
    _need_fashion()
    img, reg, names = make_fashion_canvas(3, 64, 4, cache_dir=tmp_path, return_classes=True)
    _check_pair(img, reg, 64, 5)  # background + 4 garments
    assert names[0] == "background" and len(set(names)) == 5
    counts = torch.bincount(reg.flatten()).tolist()
    assert counts[0] > 0.3 * 64 * 64 and min(counts[1:]) >= 20, counts
    assert len(list(tmp_path.glob("fashion_canvas_*.npz"))) == 1
    img2, reg2 = make_fashion_canvas(3, 64, 4, cache_dir=tmp_path)  # from the cache
    img3, reg3 = make_fashion_canvas(3, 64, 4, cache=False)  # rebuilt
    assert torch.equal(img, img2) and torch.equal(reg, reg2) and torch.equal(img, img3) and torch.equal(reg, reg3)
    assert not torch.equal(make_fashion_canvas(4, 64, 4, cache=False)[0], img)
    # class ids: 0 = background, 1 + class index; the compact map relabels them in ascending order
    _, creg, cnames = make_fashion_canvas(3, 64, 4, labels="class", cache=False, return_classes=True)
    assert len(cnames) == 11 and cnames[0] == "background"
    ids = sorted(set(creg.unique().tolist()) - {0})
    assert [cnames[i] for i in ids] == names[1:]
    for new, old in enumerate([0] + ids):
        assert torch.equal(reg == new, creg == old)
    # garments are drawn over the background: their pixels differ from the background colour
    bg = img[:, reg == 0].mean(1, keepdim=True)
    assert float((img[:, reg > 0] - bg).abs().max(0).values.mean()) > 0.1


def test_fashion_canvas_stale_cache_and_bad_inputs(tmp_path):
    _need_fashion()
    img, reg = make_fashion_canvas(0, 32, 2, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unreadable or stale"):
        img2, reg2 = make_fashion_canvas(0, 32, 2, cache_dir=tmp_path)
    assert torch.equal(img, img2) and torch.equal(reg, reg2)
    for kw, match in ((dict(seed=-1), "seed"), (dict(size=16), "size"), (dict(n_garments=0), "n_garments"),
                      (dict(n_garments=10), "n_garments"), (dict(labels="names"), "labels")):
        with pytest.raises(DataError, match=match):
            make_fashion_canvas(**{**dict(seed=0, size=32, n_garments=2, cache=False), **kw})


def test_fashion_canvas_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(rtl.MissingDependencyError, match="apt-get install -y dataset-fashion-mnist"):
        make_fashion_canvas(0, 32, 2, root=tmp_path, cache=False)


def test_real_images_fit_run_inr():
    """The loaders' outputs are valid run_inr inputs (ids 0..K-1, every id present)."""
    _need_wheel("imgaug")
    from rtl_plugin.tasks.inr import INRConfig, run_inr
    img, reg = load_quokka(16)
    res = run_inr(INRConfig.quick(methods=("rtl",), sparsities=(0.5,), figure_sparsities=(0.5,), search_steps=2,
                                  retrain_steps=3), image=img, regions=reg)
    assert res["image"]["n_regions"] == 2 and sum(res["image"]["region_pixels"]) == 256
