"""Offline image tasks with exact region maps: texture mosaics from CC0 / public-domain photos in ``skimage.data``.

``make_mosaic(seed, n_regions, size)`` tiles a ``size x size`` canvas into ``n_regions`` regions (a Voronoi
tessellation of random sites, boundaries bent by a smooth random warp) and fills every region with a crop of
a different photo shipped inside the scikit-image wheel (no download). The region map is exact by
construction: pixel ``(i, j)`` shows texture ``regions[i, j]`` and nothing else.

Deterministic: the same ``(seed, n_regions, size)`` gives bit-identical arrays (numpy ``Generator(PCG64)``),
cached as ``.npz`` under ``cache_dir`` (default ``$RTL_CACHE`` or ``~/.cache/rtl-plugin``), written
atomically (temporary file + ``os.replace``); an unreadable or stale cache file is rebuilt with a warning.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, MissingDependencyError
from .io import default_cache_dir

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


def _skimage():
    try:
        import skimage
        import skimage.data
        import skimage.transform
    except ImportError as e:
        raise MissingDependencyError(f"texture mosaics need scikit-image, which is not installed; install it "
                                     f"with: {_PIP_HINT}") from e
    return skimage


def _region_map(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
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


def _texture(skimage, name: str, rng: np.random.Generator, size: int) -> np.ndarray:
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
    sk = _skimage()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n, size, 20261123])))
    regions = _region_map(rng, n, size)
    names = [MOSAIC_SOURCES[i] for i in rng.permutation(len(MOSAIC_SOURCES))[:n]]
    image = np.zeros((size, size, 3), dtype=np.float64)
    for k, name in enumerate(names):
        tex = _texture(sk, name, rng, size)
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
    from .io import write_cache_npz
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


__all__ = ["make_mosaic", "default_cache_dir", "MOSAIC_SOURCES"]
