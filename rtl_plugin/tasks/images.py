"""Offline image tasks with region maps: texture mosaics, two real annotated photos, Fashion-MNIST canvases.

``make_mosaic(seed, n_regions, size)`` tiles a ``size x size`` canvas into ``n_regions`` regions (a Voronoi
tessellation of random sites, boundaries bent by a smooth random warp) and fills every region with a crop of
a different photo shipped inside the scikit-image wheel (no download). The region map is exact by
construction: pixel ``(i, j)`` shows texture ``regions[i, j]`` and nothing else.

Deterministic: the same ``(seed, n_regions, size)`` gives bit-identical arrays (numpy ``Generator(PCG64)``),
cached as ``.npz`` under ``cache_dir`` (default ``$RTL_CACHE`` or ``~/.cache/rtl-plugin``), written
atomically (temporary file + ``os.replace``); an unreadable or stale cache file is rebuilt with a warning.

Real photos with a real annotation (binary region maps: 1 = object, 0 = background), read from files shipped
inside two wheels WITHOUT importing them (located with ``importlib.util.find_spec(...).origin``; install with
``pip install --no-deps imgaug==0.4.0 stardist==0.9.2``):

* ``load_quokka(size)``: ``imgaug/quokka.jpg`` (960x643 RGB) with the hand-drawn polygon of
  ``imgaug/quokka_annotations.json``, rasterised with ``skimage.draw.polygon``, on imgaug's own square crop
  (x 0..643, y 0..643, which holds the whole animal).
* ``load_nuclei(size)``: ``stardist/data/images/img2d.tif`` (512x512 fluorescence microscopy, uint16) with
  its instance mask ``mask2d.tif`` (183 nuclei) merged into nuclei vs background; the grey image is
  min-max scaled and repeated on 3 channels.

Both are resized to a square ``size`` (image: anti-aliased bilinear; region map: the full-resolution binary
mask resized the same way, i.e. Gaussian-smoothed and bilinearly sampled to the output grid, and thresholded
at 0.5, so the map agrees with what the resized image shows). They are cheap to build (tens of milliseconds) and not cached.

``make_fashion_canvas(seed, size, n_garments)`` pastes ``n_garments`` Fashion-MNIST garments of different
classes (Debian ``dataset-fashion-mnist``, test split) on a plain coloured canvas, one per grid cell with a
random scale and offset, each tinted with its own colour; the region map holds 0 for the background and one
id per garment class (compact ids 1..n in ascending class order, or ``labels="class"``: 1 + the
Fashion-MNIST class index). Deterministic from the seed and cached like the mosaics.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.persist.io import default_cache_dir, write_cache_npz
from rtl_plugin.tasks.classification.data import FASHION_CLASSES, FASHION_ROOT, load_fashion_mnist

#: Photos bundled in the scikit-image wheel whose docstrings state CC0 or public domain. Grey textures
#: (brick, grass, gravel, camera) are tinted with a random colour per mosaic.
MOSAIC_SOURCES: tuple[str, ...] = ("brick", "grass", "gravel", "camera", "astronaut", "coffee", "chelsea",
                                   "rocket", "hubble_deep_field", "retina")
MIN_REGIONS, MAX_REGIONS = 3, 8
MIN_SIZE, MAX_SIZE = 16, 1024
_CACHE_FORMAT = 1
_PIP_HINT = 'pip install "rtl-plugin[data]"  (or: pip install scikit-image)'




def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(seed, n_regions, size) -> None:
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be an int >= 0, got {seed!r}; e.g. make_mosaic(seed=0, n_regions=4, size=64).")
    if not _is_int(n_regions) or not MIN_REGIONS <= n_regions <= MAX_REGIONS:
        raise DataError(f"n_regions must be an int in [{MIN_REGIONS}, {MAX_REGIONS}], got {n_regions!r}; "
                        f"a mosaic fills each region with a different photo.")
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}] (pixels per side), got {size!r}.")


def require_skimage():
    try:
        import skimage
        import skimage.data
        import skimage.transform
    except ImportError as e:
        raise MissingDependencyError(f"texture mosaics need scikit-image, which is not installed; install it "
                                     f"with: {_PIP_HINT}") from e
    return skimage


def region_map(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Warped Voronoi regions [size, size] int64 in 0..n-1, every region at least size²/(4n) pixels."""
    ii, jj = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    min_pixels = size * size // (4 * n)
    for _ in range(1000):
        sites = rng.uniform(0, size, size=(n, 2))
        amp = rng.uniform(0.03, 0.08) * size
        freq = rng.uniform(1.0, 2.5, size=2) * 2 * np.pi / size
        phase = rng.uniform(0, 2 * np.pi, size=2)
        wi = ii + amp * np.sin(freq[0] * jj + phase[0])
        wj = jj + amp * np.sin(freq[1] * ii + phase[1])
        d = (wi[None] - sites[:, 0, None, None]) ** 2 + (wj[None] - sites[:, 1, None, None]) ** 2
        regions = d.argmin(0).astype(np.int64)
        counts = np.bincount(regions.ravel(), minlength=n)
        if counts.min() >= max(min_pixels, 1):
            return regions
    raise DataError(f"could not draw {n} regions of at least {min_pixels} pixels on a {size}x{size} canvas; "
                    "use a larger size or fewer regions.")  # pragma: no cover - not reached for valid inputs


def texture(skimage, name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of photo ``name`` resized to [size, size, 3] float64 in [0, 1]."""
    img = getattr(skimage.data, name)()
    img = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 else max(float(img.max()), 1.0))
    if img.ndim == 3:
        img = img[..., :3]
    h, w = img.shape[:2]
    side = int(round(rng.uniform(0.25, 0.6) * min(h, w)))
    side = max(side, min(size, h, w))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = img[top:top + side, left:left + side]
    crop = skimage.transform.resize(crop, (size, size), order=1, anti_aliasing=True, mode="reflect")
    if crop.ndim == 2:  # grey texture: tint it
        tint = rng.uniform(0.35, 1.0, size=3)
        tint = tint / tint.max()
        base = rng.uniform(0.0, 0.2, size=3)
        crop = base + (1.0 - base) * crop[..., None] * tint
    return np.clip(crop, 0.0, 1.0)


def _build(seed: int, n: int, size: int) -> dict[str, np.ndarray]:
    sk = require_skimage()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n, size, 20261123])))
    regions = region_map(rng, n, size)
    names = [MOSAIC_SOURCES[i] for i in rng.permutation(len(MOSAIC_SOURCES))[:n]]
    image = np.zeros((size, size, 3), dtype=np.float64)
    for k, name in enumerate(names):
        tex = texture(sk, name, rng, size)
        sel = regions == k
        image[sel] = tex[sel]
    return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32),
            "regions": regions, "sources": np.array(names, dtype=str)}


def _cache_key(seed: int, n: int, size: int) -> str:
    try:
        import importlib.metadata as md
        version = md.version("scikit-image")
    except Exception:  # noqa: BLE001 - no metadata: the key still changes with our format
        version = None
    payload = {"format": _CACHE_FORMAT, "seed": int(seed), "n_regions": int(n), "size": int(size),
               "sources": list(MOSAIC_SOURCES), "scikit-image": version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check(arrays: dict, key: str, n: int, size: int) -> None:
    if str(arrays["key"]) != key:
        raise ValueError("cache key mismatch")
    im, reg, src = arrays["image"], arrays["regions"], arrays["sources"]
    if im.dtype != np.float32 or im.shape != (3, size, size) or not np.isfinite(im).all():
        raise ValueError(f"bad image {im.dtype} {im.shape}")
    if im.min() < 0 or im.max() > 1:
        raise ValueError("image outside [0, 1]")
    if reg.dtype != np.int64 or reg.shape != (size, size):
        raise ValueError(f"bad region map {reg.dtype} {reg.shape}")
    if sorted(np.unique(reg).tolist()) != list(range(n)) or src.shape != (n,):
        raise ValueError("region ids or sources inconsistent")


def _read_cache(path: Path, key: str, n: int, size: int) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("key", "image", "regions", "sources")}
        _check(arrays, key, n, size)
        return arrays
    except Exception as exc:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
        warnings.warn(f"mosaic cache {path} is unreadable or stale ({type(exc).__name__}: {exc}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, arrays: dict, key: str) -> None:
    write_cache_npz(path, {"key": np.array(key), **arrays}, what="mosaic cache")


def make_mosaic(seed: int = 0, n_regions: int = 4, size: int = 64, *, cache_dir=None, cache: bool = True,
                return_sources: bool = False):
    """A texture mosaic with its exact region map.

    Args:
        seed: int >= 0; the same (seed, n_regions, size) always gives the same mosaic.
        n_regions: number of regions, 3 to 8 (each filled with a different photo).
        size: side in pixels, 16 to 1024.
        cache_dir: folder of the ``.npz`` cache (default ``$RTL_CACHE`` or ``~/.cache/rtl-plugin``).
        cache: False skips reading and writing the cache.
        return_sources: also return the photo name of every region.
    Returns:
        ``(image, regions)``: image float32 tensor [3, size, size] in [0, 1] (RGB), regions int64 tensor
        [size, size] with ids 0..n_regions-1, every id present; plus ``sources`` (list of n_regions
        ``skimage.data`` names) with ``return_sources=True``.
    Raises:
        DataError for a bad seed / n_regions / size; MissingDependencyError without scikit-image.
    """
    _validate(seed, n_regions, size)
    seed, n_regions, size = int(seed), int(n_regions), int(size)
    arrays = None
    if cache:
        key = _cache_key(seed, n_regions, size)
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = root / f"mosaic_s{seed}_n{n_regions}_{size}px_{key[:16]}.npz"
        arrays = _read_cache(path, key, n_regions, size)
    if arrays is None:
        arrays = _build(seed, n_regions, size)
        if cache:
            _write_cache(path, arrays, key)
    image = torch.from_numpy(np.array(arrays["image"], dtype=np.float32))
    regions = torch.from_numpy(np.array(arrays["regions"], dtype=np.int64))
    if return_sources:
        return image, regions, [str(s) for s in arrays["sources"]]
    return image, regions


# --------------------------------------------------------------------------- real photos with a real annotation

#: The exact install line for the two wheels that ship the annotated photos (never imported, only read).
WHEELS_HINT = "pip install --no-deps imgaug==0.4.0 stardist==0.9.2"
QUOKKA_SQUARE = (0, 0, 643, 643)  # imgaug's "square" extract (x1, y1, x2, y2): the whole animal


def _validate_size(size) -> int:
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}] (pixels per side), got {size!r}.")
    return int(size)


def package_file(package: str, relpath: str) -> Path:
    """Path of ``relpath`` inside the installed package ``package``, found with ``importlib.util.find_spec``
    (the package is NOT imported). Raises MissingDependencyError (with the install line) when the package
    or the file is absent."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken parent / half-removed install
        spec = None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin is None:
        raise MissingDependencyError(f"the annotated photos are read from the {package!r} wheel, which is not "
                                     f"installed; install it (no dependencies needed) with: {WHEELS_HINT}")
    path = Path(origin).parent / relpath
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing from the installed {package!r} package (another "
                                     f"version?); reinstall with: {WHEELS_HINT}")
    return path


def _read_image(path: Path) -> np.ndarray:
    import skimage.io
    try:
        return np.asarray(skimage.io.imread(str(path)))
    except Exception as e:  # noqa: BLE001 - a damaged file names itself
        raise DataError(f"could not read {path} ({type(e).__name__}: {e}); reinstall with: {WHEELS_HINT}") from e


def _resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image [h, w, 3] float in [0, 1] and binary mask [h, w] -> (tensor [3, size, size] float32, [size, size]
    int64): anti-aliased (Gaussian-smoothed) bilinear image, the mask resized the same way and thresholded at
    0.5."""
    sk = require_skimage()
    img = sk.transform.resize(image, (size, size), order=1, anti_aliasing=True, mode="reflect")
    frac = sk.transform.resize(mask.astype(np.float64), (size, size), order=1, anti_aliasing=True, mode="reflect")
    regions = (frac >= 0.5).astype(np.int64)
    if regions.min() == regions.max():
        raise DataError(f"at {size}x{size} pixels the annotation vanishes (one region left); use a larger size.")
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(regions)


def load_quokka(size: int = 64, *, return_mask: bool = False):
    """The imgaug quokka photo with its annotated polygon as a 2-region map (1 = quokka, 0 = background).

    Reads ``quokka.jpg`` and ``quokka_annotations.json`` from the installed imgaug wheel without importing
    imgaug, crops imgaug's square extract (643x643 pixels, the whole animal), rasterises the polygon with
    ``skimage.draw.polygon`` at full resolution and resizes both to ``size``.

    Args:
        size: side in pixels, 16 to 1024.
        return_mask: also return the full-resolution boolean mask [643, 643] (numpy).
    Returns:
        ``(image, regions)``: float32 [3, size, size] in [0, 1] (RGB) and int64 [size, size] in {0, 1}
        (about 40% quokka).
    Raises:
        DataError for a bad size; MissingDependencyError without the imgaug wheel (``pip install --no-deps
        imgaug==0.4.0 stardist==0.9.2``) or scikit-image.
    """
    size = _validate_size(size)
    sk = require_skimage()
    import skimage.draw
    jpg = package_file("imgaug", "quokka.jpg")
    ann = package_file("imgaug", "quokka_annotations.json")
    photo = _read_image(jpg)
    try:
        polys = json.loads(ann.read_text())["polygons"]
        xs = np.array([float(p["x"]) for p in polys[0]["keypoints"]])
        ys = np.array([float(p["y"]) for p in polys[0]["keypoints"]])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{ann} does not hold imgaug's quokka polygon ({e!r}); reinstall with: {WHEELS_HINT}") from e
    if photo.ndim != 3 or photo.shape[2] < 3 or xs.size < 3:
        raise DataError(f"unexpected quokka files: image {photo.shape}, polygon of {xs.size} points; "
                        f"reinstall with: {WHEELS_HINT}")
    mask = np.zeros(photo.shape[:2], dtype=bool)
    rr, cc = skimage.draw.polygon(ys, xs, shape=mask.shape)
    mask[rr, cc] = True
    x1, y1, x2, y2 = QUOKKA_SQUARE
    photo = photo[y1:y2, x1:x2, :3].astype(np.float64) / 255.0
    mask = mask[y1:y2, x1:x2]
    del sk
    image, regions = _resize_pair(photo, mask, size)
    return (image, regions, mask) if return_mask else (image, regions)


def load_nuclei(size: int = 64, *, return_mask: bool = False):
    """The stardist 2-D nuclei image with its instance mask as a 2-region map (1 = nucleus, 0 = background).

    Reads ``data/images/img2d.tif`` (512x512, uint16 fluorescence) and ``mask2d.tif`` (instance labels) from
    the installed stardist wheel without importing stardist; instances are merged (mask > 0), the grey image
    is min-max scaled to [0, 1] and repeated on the 3 channels, both resized to ``size``.

    Args:
        size: side in pixels, 16 to 1024 (at 64 px a nucleus is about 3-5 pixels across).
        return_mask: also return the full-resolution instance mask [512, 512] (numpy int).
    Returns:
        ``(image, regions)``: float32 [3, size, size] in [0, 1] (three equal channels) and int64
        [size, size] in {0, 1} (about 20% nuclei).
    Raises:
        DataError for a bad size; MissingDependencyError without the stardist wheel (``pip install --no-deps
        imgaug==0.4.0 stardist==0.9.2``) or scikit-image.
    """
    size = _validate_size(size)
    require_skimage()
    img = _read_image(package_file("stardist", "data/images/img2d.tif"))
    inst = _read_image(package_file("stardist", "data/images/mask2d.tif"))
    if img.ndim != 2 or inst.shape != img.shape:
        raise DataError(f"unexpected nuclei files: image {img.shape}, mask {inst.shape}; reinstall with: {WHEELS_HINT}")
    img = img.astype(np.float64)
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        raise DataError(f"the nuclei image is constant; reinstall with: {WHEELS_HINT}")
    grey = (img - lo) / (hi - lo)
    image, regions = _resize_pair(np.repeat(grey[..., None], 3, axis=2), inst > 0, size)
    return (image, regions, inst) if return_mask else (image, regions)


# --------------------------------------------------------------------------- Fashion-MNIST canvases

MIN_GARMENTS, MAX_GARMENTS = 1, 9
_FASHION_FORMAT = 1
_GARMENT_THRESHOLD = 0.25  # garment pixel: resized intensity >= this (Fashion-MNIST background is 0)


def _fashion_source(root):
    images, labels = load_fashion_mnist(root, split="test")  # MissingDependencyError with the apt line
    return images, labels, FASHION_CLASSES, str(Path(FASHION_ROOT if root is None else root).resolve())


def _build_canvas(seed: int, size: int, n: int, root) -> dict[str, np.ndarray]:
    sk = require_skimage()
    images, labels, names, _ = _fashion_source(root)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n, size, 20261124])))
    classes = np.sort(rng.choice(10, size=n, replace=False))
    grid = int(np.ceil(np.sqrt(n)))
    cell = size / grid
    cells = rng.permutation(grid * grid)[:n]
    bg = rng.uniform(0.05, 0.95, size=3)
    # a gentle linear gradient on the background so the INR has something to fit there too
    ii, jj = np.meshgrid(np.linspace(-0.5, 0.5, size), np.linspace(-0.5, 0.5, size), indexing="ij")
    g = rng.uniform(-0.15, 0.15, size=(2, 3))
    image = np.clip(bg + ii[..., None] * g[0] + jj[..., None] * g[1], 0.0, 1.0)
    regions = np.zeros((size, size), dtype=np.int64)
    picks = []
    for c, pos in zip(classes, cells):
        idx = np.flatnonzero(labels == c)
        pick = int(idx[rng.integers(idx.size)])
        picks.append(pick)
        side = max(int(round(cell * rng.uniform(0.8, 1.0))), 4)
        top = int(pos // grid * cell + rng.integers(0, max(int(cell) - side, 0) + 1))
        left = int(pos % grid * cell + rng.integers(0, max(int(cell) - side, 0) + 1))
        side = min(side, size - top, size - left)
        alpha = sk.transform.resize(images[pick].astype(np.float64) / 255.0, (side, side), order=1,
                                    anti_aliasing=True, mode="constant")
        colour = rng.uniform(0.0, 1.0, size=3)
        while np.abs(colour - bg).max() < 0.35:  # keep the garment visible against the background
            colour = rng.uniform(0.0, 1.0, size=3)
        win = (slice(top, top + side), slice(left, left + side))
        a = np.clip(alpha, 0.0, 1.0)[..., None]
        image[win] = image[win] * (1 - a) + colour * a
        regions[win][alpha >= _GARMENT_THRESHOLD] = int(c) + 1
    return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32), "regions": regions,
            "classes": classes.astype(np.int64), "picks": np.array(picks, dtype=np.int64)}


def make_fashion_canvas(seed: int = 0, size: int = 64, n_garments: int = 4, *, labels: str = "compact",
                        root=None, cache_dir=None, cache: bool = True, return_classes: bool = False):
    """A canvas of ``n_garments`` Fashion-MNIST garments (all of different classes) with its region map.

    The canvas is split into a ceil(sqrt(n)) x ceil(sqrt(n)) grid; each garment (a random test-split image
    of its class) fills 80-100% of a random cell at a random offset, tinted with its own colour and
    alpha-blended (alpha = the garment's intensity) over a plain background with a faint colour gradient.
    A pixel belongs to a garment where its resized intensity is >= 0.25 (background elsewhere); a later
    garment never overlaps an earlier one (one garment per cell).

    Args:
        seed: int >= 0; the same (seed, size, n_garments) always gives the same canvas.
        size: side in pixels, 32 to 1024.
        n_garments: 1 to 9 garments (so 2 to 10 regions with the background).
        labels: "compact": ids 0 (background), 1..n_garments (garment classes in ascending class order),
            ready for ``run_inr``; "class": 0 (background) or 1 + the Fashion-MNIST class index (0..10).
        root: folder of the IDX files (default ``/usr/share/datasets/fashion-mnist``).
        cache_dir: as in :func:`make_mosaic`.
        cache: as in :func:`make_mosaic`.
        return_classes: also return the class name of every region id (``"background"`` first).
    Returns:
        ``(image, regions)``: float32 [3, size, size] in [0, 1] and int64 [size, size]; plus the names with
        ``return_classes=True``.
    Raises:
        DataError for bad arguments; MissingDependencyError without the Debian Fashion-MNIST files
        (``apt-get install -y dataset-fashion-mnist``) or scikit-image.
    """
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be an int >= 0, got {seed!r}; e.g. make_fashion_canvas(seed=0, size=64).")
    if not _is_int(size) or not 32 <= size <= MAX_SIZE:
        raise DataError(f"size must be an int in [32, {MAX_SIZE}] (pixels per side; garments need room), got {size!r}.")
    if not _is_int(n_garments) or not MIN_GARMENTS <= n_garments <= MAX_GARMENTS:
        raise DataError(f"n_garments must be an int in [{MIN_GARMENTS}, {MAX_GARMENTS}], got {n_garments!r}.")
    if labels not in ("compact", "class"):
        raise DataError(f"labels must be 'compact' (ids 0..n_garments) or 'class' (0 = background, 1 + class "
                        f"index), got {labels!r}.")
    seed, size, n = int(seed), int(size), int(n_garments)
    require_skimage()
    arrays = None
    if cache:
        rootp = str(Path(FASHION_ROOT if root is None else root).resolve())
        payload = {"format": _FASHION_FORMAT, "seed": seed, "size": size, "n": n, "root": rootp}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = base / f"fashion_canvas_s{seed}_n{n}_{size}px_{key[:16]}.npz"
        arrays = _read_canvas_cache(path, key, n, size)
    if arrays is None:
        arrays = _build_canvas(seed, size, n, root)
        if cache:
            write_cache_npz(path, {"key": np.array(key), **arrays}, what="fashion canvas cache")
    classes = [int(c) for c in arrays["classes"]]
    regions = np.array(arrays["regions"], dtype=np.int64)
    if labels == "compact":
        lut = np.zeros(11, dtype=np.int64)
        for i, c in enumerate(classes):
            lut[c + 1] = i + 1
        regions = lut[regions]
        names = ["background"] + [FASHION_CLASSES[c] for c in classes]
    else:
        names = ["background"] + list(FASHION_CLASSES)
    image = torch.from_numpy(np.array(arrays["image"], dtype=np.float32))
    out = (image, torch.from_numpy(regions))
    return out + (names,) if return_classes else out


def _read_canvas_cache(path: Path, key: str, n: int, size: int) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("key", "image", "regions", "classes", "picks")}
        if str(arrays["key"]) != key:
            raise ValueError("cache key mismatch")
        im, reg, cls = arrays["image"], arrays["regions"], arrays["classes"]
        if im.dtype != np.float32 or im.shape != (3, size, size) or not np.isfinite(im).all() \
                or im.min() < 0 or im.max() > 1:
            raise ValueError(f"bad image {im.dtype} {im.shape}")
        if reg.dtype != np.int64 or reg.shape != (size, size) or cls.shape != (n,):
            raise ValueError(f"bad region map {reg.dtype} {reg.shape} or classes {cls.shape}")
        if not set(np.unique(reg).tolist()) <= {0} | {int(c) + 1 for c in cls}:
            raise ValueError("region ids and classes inconsistent")
        return arrays
    except Exception as exc:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
        warnings.warn(f"fashion canvas cache {path} is unreadable or stale ({type(exc).__name__}: {exc}); "
                      "rebuilding it", RuntimeWarning, stacklevel=3)
        return None


__all__ = ["make_mosaic", "default_cache_dir", "MOSAIC_SOURCES", "load_quokka", "load_nuclei",
           "make_fashion_canvas", "package_file", "WHEELS_HINT"]
