"""The user's own images on disk: torchvision's ImageFolder tree for classification, images/ + masks/ for
segmentation, and a contexts table (which site, camera or domain each image came from).

Classification layout (torchvision ``ImageFolder``)::

    DIR/<class name>/<any sub folders>/<image>.{jpg,jpeg,png,bmp,ppm,pgm,tif,tiff,webp}

Segmentation layout (the smp habit)::

    DIR/images/<name>.<ext>      RGB (or grey) images
    DIR/masks/<name>.png         integer class maps, one class id per pixel (PNG mode L, P or I)
    DIR/classes.txt              optional: one class name per line (default class_0, class_1, ...)

Contexts table: a CSV file ``relative path,context`` (a header row ``path,context`` is optional); one ticket
per context. A path is relative to the folder the image is in (``--data`` or ``--val-data``); every image needs
one row and every row must name an image.

Images are decoded with Pillow and kept in memory as float32 tensors of the model's input size (classification:
timm's evaluation transform of the model, i.e. its resize, centre crop and normalisation; segmentation: a plain
resize to ``size x size``, nearest for masks). Hidden files and folders (``.ipynb_checkpoints``) are ignored.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rtl_plugin.errors import DataError, MissingDependencyError

#: The image suffixes torchvision's ImageFolder accepts (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: In-memory data beyond this many bytes is refused (the runners keep every image as a tensor).
MAX_BYTES = 8 * 2 ** 30
NO_CONTEXT = "all"
#: Mask class ids from here on need a classes.txt (a 255 is far more often a void label than a class).
MAX_MASK_CLASSES = 64

__all__ = ["IMAGE_EXTENSIONS", "FolderScan", "FolderData", "MaskFolder", "scan_image_folder", "read_contexts",
           "split_holdout", "cap_per_group", "read_images", "load_image_folder", "load_mask_folder"]


# --------------------------------------------------------------------------- scanning
def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in rel):
            out.append(p)
    return out


def _as_folder(root, what: str) -> Path:
    if not isinstance(root, (str, Path)) or not str(root):
        raise DataError(f"{what} must be a folder path, got {root!r}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; pass the folder that holds one sub folder per class "
                        "(torchvision ImageFolder layout: DIR/<class>/<image>.jpg).")
    return root.resolve()


@dataclass
class FolderScan:
    """The images of an ImageFolder tree: ``files`` (paths relative to ``root``, POSIX), their class ids and
    the class names (the sub folder names, sorted)."""
    root: Path
    files: list[str]
    labels: list[int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)


def scan_image_folder(root, *, class_names: list[str] | None = None, what: str = "--data") -> FolderScan:
    """The images of ``root/<class>/...``; with ``class_names`` (the training classes) the folder's classes
    must be among them and keep their ids (a validation folder)."""
    root = _as_folder(root, what)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes:
        hint = (f" ({len(loose)} images lie directly in it)" if loose else "")
        raise DataError(f"{what} {root} has no class sub folders{hint}; put every image in a sub folder named "
                        "after its class: DIR/<class>/<image>.jpg.")
    per_class = {c: _images_under(root / c) for c in classes}
    if not any(per_class.values()):
        raise DataError(f"{what} {root} holds no image ({', '.join(IMAGE_EXTENSIONS)}) in its class folders "
                        f"{classes[:5]}; add images or point {what} at the right folder.")
    if class_names is None:
        classes = [c for c in classes if per_class[c]]
        if len(classes) < 2:
            raise DataError(f"{what} {root} has images of a single class ({classes[0]!r}); classification needs "
                            "at least 2 class folders with images.")
        class_names = classes
    else:
        unknown = [c for c in classes if per_class[c] and c not in class_names]
        if unknown:
            raise DataError(f"{what} {root} has classes {unknown} that the training folder lacks (training "
                            f"classes: {class_names}); rename or remove them.")
    files, labels = [], []
    for c in class_names:
        for p in per_class.get(c, []):
            files.append(p.relative_to(root).as_posix())
            labels.append(class_names.index(c))
    return FolderScan(root, files, labels, list(class_names))


# --------------------------------------------------------------------------- contexts
def _clean_rel(path: str) -> str:
    p = path.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def read_contexts(csv_path, scans: list[FolderScan]) -> list[list[str]]:
    """Context name of every image of every scan (same order as ``scan.files``), from a CSV of
    ``relative path,context`` rows; an image without a row or a row naming no image raises DataError."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DataError(f"contexts file {csv_path} does not exist; pass a CSV of 'relative path,context' rows.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read contexts file {csv_path} ({e}); save it as UTF-8 CSV.") from e
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "context"]:
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows, 1) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad or not rows:
        raise DataError(f"contexts file {csv_path}: {'rows ' + str(bad[:5]) if bad else 'no rows'} lack a path "
                        "and a context; every row must be 'relative path,context'.")
    table: dict[str, str] = {}
    for r in rows:
        rel, ctx = _clean_rel(r[0]), r[1].strip()
        if table.setdefault(rel, ctx) != ctx:
            raise DataError(f"contexts file {csv_path} gives {rel} two contexts ({table[rel]!r}, {ctx!r}); keep one.")
    known = {f for s in scans for f in s.files}
    unknown = sorted(set(table) - known)
    if unknown:
        raise DataError(f"contexts file {csv_path} names {len(unknown)} files that are not images of the data "
                        f"folders (e.g. {unknown[:3]}); paths are relative to --data / --val-data, e.g. "
                        f"{next(iter(sorted(known)), 'cat/001.jpg')}. Fix or remove those rows.")
    out = []
    for s in scans:
        missing = [f for f in s.files if f not in table]
        if missing:
            raise DataError(f"contexts file {csv_path} has no row for {len(missing)} images of {s.root} (e.g. "
                            f"{missing[:3]}); add a 'path,context' row for each.")
        out.append([table[f] for f in s.files])
    return out


# --------------------------------------------------------------------------- splitting
def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    exact = counts.astype(np.float64) * total / max(int(counts.sum()), 1)
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - int(out.sum())]] += 1
    return out


def cap_per_group(groups: np.ndarray, strata: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices keeping at most ``cap`` per group, stratified by ``strata`` inside a group (seeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if cap is None or len(members) <= cap:
            keep.append(members)
            continue
        values, counts = np.unique(strata[members], return_counts=True)
        for v, n in zip(values, _apportion(counts, cap)):
            keep.append(rng.permutation(members[strata[members] == v])[:n])
    return np.sort(np.concatenate(keep))


def split_holdout(strata: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, holdout) indices, stratified by ``strata`` (e.g. context x class); a stratum of one item
    stays in training."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the held-out fraction must lie in (0, 1), got {fraction!r}; e.g. 0.25.")
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for v in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == v))
        n = int(round(len(members) * fraction)) if len(members) > 1 else 0
        n = min(max(n, 1 if len(members) > 1 else 0), len(members) - 1)
        hold.append(members[:n])
        train.append(members[n:])
    train, hold = np.sort(np.concatenate(train)), np.sort(np.concatenate(hold))
    if len(hold) == 0:
        raise DataError("too few images to hold out a test split (every class has one image); add images or pass "
                        "--val-data DIR.")
    return train, hold


# --------------------------------------------------------------------------- reading
def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise MissingDependencyError("reading image files needs Pillow: pip install pillow") from e
    return Image, UnidentifiedImageError


def read_images(root: Path, files: list[str], convert: Callable, *, unreadable: str = "skip",
                progress: bool = False, desc: str = "reading images") -> tuple[list, list[int], list[str]]:
    """``convert(PIL image)`` of every file, the indices read and ``"file: reason"`` for each unreadable one.

    ``unreadable="skip"`` skips them (the caller reports the count), ``"error"`` raises DataError listing them."""
    if unreadable not in ("skip", "error"):
        raise DataError(f"unreadable must be 'skip' or 'error', got {unreadable!r}.")
    Image, Unidentified = _pil()
    from tqdm.auto import tqdm
    out, kept, skipped = [], [], []
    for i, f in enumerate(tqdm(files, desc=desc, disable=not progress, leave=False)):
        try:
            with Image.open(root / f) as im:
                im.load()
                out.append(convert(im))
            kept.append(i)
        except (OSError, Unidentified, ValueError, SyntaxError) as e:
            skipped.append(f"{f}: {type(e).__name__}: {e}")
    if skipped and unreadable == "error":
        raise DataError(f"{len(skipped)} of {len(files)} images in {root} cannot be read (e.g. {skipped[:3]}); "
                        "delete or re-save them, or pass --unreadable skip to leave them out.")
    return out, kept, skipped


def _check_memory(n: int, per_item: int, what: str) -> None:
    if n * per_item > MAX_BYTES:
        raise DataError(f"{n} {what} at this size need {n * per_item / 2 ** 30:.1f} GiB in memory (limit "
                        f"{MAX_BYTES / 2 ** 30:.0f} GiB); lower --image-size or cap them with --max-per-domain.")


# --------------------------------------------------------------------------- classification
@dataclass
class FolderData:
    """Train and test images of a classification folder: the two DomainDatasets (``domain`` = context) and
    what was read (files relative to their folder, skipped files with the reason, caps)."""
    train: object
    test: object
    train_files: list[str]
    test_files: list[str]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict:
        return {"train_images": len(self.train_files), "test_images": len(self.test_files),
                "classes": list(self.train.class_names), "contexts": list(self.train.domain_names),
                "skipped": len(self.skipped), "skipped_files": self.skipped[:50], "notes": self.notes}


def _select(scan: FolderScan, ctx: list[str], cap: int | None, seed: int) -> tuple[list[str], list[int], list[str]]:
    idx = cap_per_group(np.array(ctx), np.array(scan.labels), cap, seed)
    return [scan.files[i] for i in idx], [scan.labels[i] for i in idx], [ctx[i] for i in idx]


def load_image_folder(data_dir, *, transform: Callable, image_size: int, val_dir=None, val_fraction: float = 0.25,
                      contexts=None, seed: int = 0, max_per_context: int | None = None, unreadable: str = "skip",
                      progress: bool = False, log: Callable[[str], None] = print) -> FolderData:
    """Train / test DomainDatasets of an ImageFolder tree: ``transform(PIL RGB image) -> [3, S, S]`` tensor,
    test = ``val_dir`` or a seeded split of ``val_fraction`` (stratified by context and class); ``contexts`` =
    CSV of ``relative path,context`` (one domain per context; default one domain ``"all"``);
    ``max_per_context`` caps the images read per context and folder (stratified by class)."""
    from rtl_plugin.tasks.classification.data import DomainDataset
    train_scan = scan_image_folder(data_dir, what="--data")
    scans = [train_scan] + ([scan_image_folder(val_dir, class_names=train_scan.class_names, what="--val-data")]
                            if val_dir is not None else [])
    ctx = read_contexts(contexts, scans) if contexts is not None else [[NO_CONTEXT] * len(s) for s in scans]
    notes = []
    picked = [_select(s, c, max_per_context, seed + i) for i, (s, c) in enumerate(zip(scans, ctx))]
    for s, p in zip(scans, picked):
        if len(p[0]) < len(s):
            notes.append(f"{s.root}: read {len(p[0])} of {len(s)} images (at most {max_per_context} per context; "
                         "--max-per-domain 0 reads all)")
    if val_dir is None:
        files, labels, cs = picked[0]
        tr, te = split_holdout(np.array([f"{c}\0{y}" for c, y in zip(cs, labels)]), val_fraction, seed)
        picked = [tuple([v[i] for i in tr] for v in picked[0]), tuple([v[i] for i in te] for v in picked[0])]
        roots = [train_scan.root, train_scan.root]
    else:
        roots = [s.root for s in scans]
    _check_memory(sum(len(p[0]) for p in picked), 3 * image_size * image_size * 4, "images")
    domain_names = sorted(set(picked[0][2]))
    parts, skipped = [], []
    for split, root, (files, labels, cs) in zip(("train", "test"), roots, picked):
        x, kept, bad = read_images(root, files, lambda im: transform(im.convert("RGB")), unreadable=unreadable,
                                   progress=progress, desc=f"reading {split} images")
        skipped += bad
        unseen = sorted({cs[i] for i in kept} - set(domain_names))
        if unseen:
            raise DataError(f"contexts {unseen} have test images but no training image; give each context "
                            "training images (or merge those contexts).")
        parts.append((x, [files[i] for i in kept], [labels[i] for i in kept], [domain_names.index(cs[i]) for i in kept]))
    if skipped:
        log(f"skipped {len(skipped)} unreadable images (e.g. {skipped[0]}); --unreadable error refuses them")
    datasets = []
    for split, (x, files, labels, dom) in zip(("training", "test"), parts):
        if not files:
            raise DataError(f"no readable {split} image is left; check the folders' images.")
        datasets.append(DomainDataset(x=torch.stack(x).float(), y=torch.tensor(labels, dtype=torch.int64),
                                      domain=torch.tensor(dom, dtype=torch.int64), domain_names=list(domain_names),
                                      class_names=list(train_scan.class_names)))
    if len(set(parts[0][2])) < 2:
        raise DataError("the readable training images cover a single class; classification needs 2 or more.")
    return FolderData(datasets[0], datasets[1], parts[0][1], parts[1][1], skipped, notes)


# --------------------------------------------------------------------------- segmentation
@dataclass
class MaskFolder:
    """Images [N, 3, S, S] float32 in [0, 1] and label maps [N, S, S] int64 of a segmentation folder
    (the interface of :class:`rtl_plugin.tasks.segmentation.SegMosaicDataset` the segmentation task uses)."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    files: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def contains(self, k: int) -> torch.Tensor:
        """Indices [M] of the images that contain class ``k``."""
        return (self.labels == int(k)).flatten(1).any(1).nonzero().flatten()


def _pairs(root: Path, what: str) -> list[tuple[str, str]]:
    """``(image file, mask file)`` relative to ``root``, paired by name (masks/<stem>.png)."""
    root = _as_folder(root, what)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"{what} {root} needs the sub folders images/ and masks/ (integer class maps, same "
                        "names as the images, .png); found "
                        f"{sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p)) or 'none'}.")
    images = {p.relative_to(img_dir).with_suffix("").as_posix(): p for p in _images_under(img_dir)}
    masks = {p.relative_to(mask_dir).with_suffix("").as_posix(): p for p in _images_under(mask_dir)}
    if not images:
        raise DataError(f"{what} {img_dir} holds no image; add images ({', '.join(IMAGE_EXTENSIONS)}).")
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise DataError(f"{what} {root}: every image needs a mask of the same name and vice versa; "
                        f"{len(no_mask)} images without a mask (e.g. {no_mask[:3]}), {len(no_image)} masks without "
                        "an image (e.g. " + f"{no_image[:3]}); add or remove those files.")
    return [(images[s].relative_to(root).as_posix(), masks[s].relative_to(root).as_posix()) for s in sorted(images)]


def _read_pairs(root: Path, pairs, size: int, unreadable: str, progress: bool):
    """Images and masks of ``pairs`` that both read, their pair indices and the unreadable files."""
    images, kept_i, bad_i = read_images(root, [p[0] for p in pairs], _image_reader(size), unreadable=unreadable,
                                        progress=progress, desc="reading images")
    masks, kept_m, bad_m = read_images(root, [p[1] for p in pairs], _mask_reader(size), unreadable=unreadable,
                                       progress=progress, desc="reading masks")
    both = sorted(set(kept_i) & set(kept_m))
    img_at, mask_at = dict(zip(kept_i, images)), dict(zip(kept_m, masks))
    return [img_at[i] for i in both], [mask_at[i] for i in both], both, bad_i + bad_m


def _image_reader(size: int):
    Image, _ = _pil()

    def read(im):
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(rgb.transpose(2, 0, 1).copy())
    return read


def _mask_reader(size: int):
    Image, _ = _pil()

    def read(im):
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"mask mode {im.mode} is not a class map; save masks as single-channel PNG (mode L or "
                             "P) holding one class id per pixel")
        return torch.from_numpy(np.asarray(im.resize((size, size), Image.NEAREST), dtype=np.int64))
    return read


def _class_names(root: Path, num_classes: int) -> tuple[str, ...]:
    f = root / "classes.txt"
    if not f.is_file():
        return tuple(f"class_{k}" for k in range(num_classes))
    names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(names) < num_classes or len(set(names)) != len(names):
        raise DataError(f"{f} lists {len(names)} distinct class names but the masks hold class ids up to "
                        f"{num_classes - 1}; list one distinct name per class id, in id order.")
    return tuple(names)


def load_mask_folder(data_dir, *, size: int, val_dir=None, val_fraction: float = 0.25, seed: int = 0,
                     max_images: int | None = None, unreadable: str = "skip", progress: bool = False,
                     log: Callable[[str], None] = print) -> tuple[MaskFolder, MaskFolder, list[str]]:
    """(train, test, notes) of ``DIR/images`` + ``DIR/masks`` folders resized to ``size x size``; test =
    ``val_dir`` (same layout) or a seeded ``val_fraction`` of the images; ``max_images`` caps each folder."""
    root = _as_folder(data_dir, "--data")
    sources = [(root, _pairs(root, "--data"))]
    if val_dir is not None:
        sources.append((_as_folder(val_dir, "--val-data"), _pairs(val_dir, "--val-data")))
    notes = []
    for i, (r, pairs) in enumerate(sources):
        if max_images is not None and len(pairs) > max_images:
            keep = np.sort(np.random.default_rng(seed + i).permutation(len(pairs))[:max_images])
            sources[i] = (r, [pairs[j] for j in keep])
            notes.append(f"{r}: read {max_images} of {len(pairs)} images (--max-per-domain 0 reads all)")
    _check_memory(sum(len(p) for _, p in sources), 4 * size * size * 4, "images and masks")
    read, skipped = [], []
    for r, pairs in sources:
        x, y, kept, bad = _read_pairs(r, pairs, size, unreadable, progress)
        skipped += bad
        read.append((x, y, [pairs[i][0] for i in kept], r))
    if skipped:
        log(f"skipped {len(skipped)} unreadable files (e.g. {skipped[0]}); --unreadable error refuses them")
    if not read[0][0]:
        raise DataError(f"no readable image + mask pair in {root}; check the files.")
    if val_dir is None:
        x, y, files, r = read[0]
        tr, te = split_holdout(np.zeros(len(files), dtype=np.int64), val_fraction, seed)
        read = [([x[i] for i in tr], [y[i] for i in tr], [files[i] for i in tr], r),
                ([x[i] for i in te], [y[i] for i in te], [files[i] for i in te], r)]
    if not read[1][0]:
        raise DataError(f"no readable image + mask pair in {val_dir}; check the files.")
    labels = [torch.stack(y) for _, y, _, _ in read]
    if min(int(t.min()) for t in labels) < 0:
        raise DataError("masks hold negative class ids; class ids are 0, 1, ..., C-1.")
    top = max(int(t.max()) for t in labels)
    if top < 1:
        raise DataError(f"the masks in {root} hold a single class (id 0); segmentation needs 2 or more classes.")
    if top >= MAX_MASK_CLASSES and not (root / "classes.txt").is_file():
        raise DataError(f"the masks hold class ids up to {top}; masks must be class ids 0..C-1, not colours or a "
                        f"void label like 255: map those pixels to a class (or, with {top + 1} real classes, list "
                        f"their names in {root / 'classes.txt'}).")
    names = _class_names(root, top + 1)
    folders = [MaskFolder(torch.stack(x), t, names, files) for (x, _, files, _), t in zip(read, labels)]
    return folders[0], folders[1], notes
