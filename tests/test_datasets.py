"""Dataset readers: idx files (Fashion-MNIST), ImageFolder trees, class subsets, seeded splits."""
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trex_hub import datasets as D


def write_fmnist(root: Path, n_train=40, n_test=20, gz=True, seed=0):
    """Tiny Fashion-MNIST look-alike: label-dependent images, real file names."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 50, size=(n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 4, :] = 250  # a class-specific bright band
        ext = ".gz" if gz else ""
        D.write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        D.write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = (images, labels)
    return out


# ---- idx ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_roundtrip(tmp_path, name):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    D.write_idx(tmp_path / name, arr)
    back = D.read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_other_dtypes(tmp_path):
    arr = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    D.write_idx(tmp_path / "f.idx", arr)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "f.idx"), arr)
    ints = np.array([70000, -5], dtype=np.int32)
    D.write_idx(tmp_path / "i.idx", ints)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "i.idx"), ints)


def test_idx_header_is_big_endian_reference_bytes(tmp_path):
    # hand-written file: magic 0x00000801, one dimension of length 3, values 7 8 9
    (tmp_path / "x").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "x"), [7, 8, 9])


def test_idx_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError):
        D.read_idx(tmp_path / "missing-idx1-ubyte")
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(D.DatasetFormatError, match="magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(D.DatasetFormatError, match="truncated"):
        D.read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DatasetFormatError):
        D.read_idx(tmp_path / "broken.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(D.DatasetFormatError, match="empty"):
        D.read_idx(tmp_path / "empty")


# ---- Fashion-MNIST -----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader(tmp_path, gz):
    ref = write_fmnist(tmp_path / "fm", gz=gz)
    train = D.load_fashion_mnist(tmp_path / "fm", "train")
    assert train.images.dtype == np.uint8 and train.images.shape == (40, 28, 28)
    np.testing.assert_array_equal(train.images, ref["train"][0])
    np.testing.assert_array_equal(train.labels, ref["train"][1].astype(np.int64))
    assert train.class_names == list(D.FASHION_MNIST_CLASSES)
    test = D.load_fashion_mnist(tmp_path / "fm", "test")
    assert len(test) == 20


def test_fashion_mnist_torchvision_layout_and_env(tmp_path, monkeypatch):
    write_fmnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert len(D.load_fashion_mnist(tmp_path / "tv", "train")) == 40
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path / "tv"))
    assert len(D.load_fashion_mnist(None, "test")) == 20


def test_fashion_mnist_class_subsets(tmp_path):
    write_fmnist(tmp_path / "fm")
    a = D.load_fashion_mnist(tmp_path / "fm", "train", classes="0-4")
    assert sorted(set(a.labels.tolist())) == [0, 1, 2, 3, 4] and len(a) == 20
    assert a.class_names == list(D.FASHION_MNIST_CLASSES[:5])
    b = D.load_fashion_mnist(tmp_path / "fm", "train", classes=[9, 5, 6, 7, 8])
    assert b.class_names[0] == "Ankle boot" and len(b) == 20
    raw = D.load_fashion_mnist(tmp_path / "fm", "train")
    # relabelled in the order given: original 9 -> 0, 5 -> 1
    orig = raw.labels[np.isin(raw.labels, [5, 6, 7, 8, 9])]
    np.testing.assert_array_equal(b.labels, np.array([1, 2, 3, 4, 0])[orig - 5])
    kept = D.load_fashion_mnist(tmp_path / "fm", "train", classes="5-9", relabel=False)
    assert sorted(set(kept.labels.tolist())) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="out of range"):
        D.load_fashion_mnist(tmp_path / "fm", "train", classes="8-12")


def test_fashion_mnist_limit_is_balanced_and_seeded(tmp_path):
    write_fmnist(tmp_path / "fm", n_train=200)
    a = D.load_fashion_mnist(tmp_path / "fm", "train", limit=50, seed=3)
    b = D.load_fashion_mnist(tmp_path / "fm", "train", limit=50, seed=3)
    assert len(a) == 50 and np.bincount(a.labels).tolist() == [5] * 10
    np.testing.assert_array_equal(a.images, b.images)


def test_fashion_mnist_torch_dataset(tmp_path):
    write_fmnist(tmp_path / "fm")
    ds = D.FashionMNIST(tmp_path / "fm", "test", classes=[5, 6, 7, 8, 9])
    img, y = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert 0 <= y < 5 and len(ds) == 10 and ds.classes[0] == "Sandal"
    assert ds.images.shape == (10, 28, 28)
    t = D.FashionMNIST(tmp_path / "fm", "train", transform=lambda im: np.asarray(im).shape)
    assert t[3] == ((28, 28, 3), 3)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_fashion_mnist(tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert "train-{images-idx3,labels-idx1}-ubyte" in msg and "dataset-fashion-mnist" in msg
    assert isinstance(err.value, FileNotFoundError)
    write_fmnist(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError, match="'test'"):
        D.load_fashion_mnist(tmp_path / "fm", "test")
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist(tmp_path / "fm", "validation")


def test_fashion_mnist_mismatched_files(tmp_path):
    write_fmnist(tmp_path / "fm")
    D.write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(D.DatasetFormatError, match="labels for 40 images"):
        D.load_fashion_mnist(tmp_path / "fm", "train")


@pytest.mark.skipif(not Path(D.DEFAULT_FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    test = D.load_fashion_mnist(split="test")
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ---- class selection, splits, subsets ---------------------------------------------------------
def test_parse_classes():
    assert D.parse_classes(None) is None
    assert D.parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert D.parse_classes("5,6,7") == [5, 6, 7]
    assert D.parse_classes("0-1, 7") == [0, 1, 7]
    assert D.parse_classes([5, "6", "8-9"]) == [5, 6, 8, 9]
    assert D.parse_classes(["Bag", "Sandal"], D.FASHION_MNIST_CLASSES) == [8, 5]
    assert D.parse_classes(3) == [3]
    for bad in ("4-2", "", "1,1", ["nope"]):
        with pytest.raises(ValueError):
            D.parse_classes(bad, D.FASHION_MNIST_CLASSES)


def test_per_class_split_sizes_and_seeding():
    labels = np.repeat([0, 1, 2, 3, 4], [10, 5, 1, 2, 13])
    keep, held = D.per_class_split(labels, 0.2, seed=0)
    # floor(0.2 n + 0.5), at least 1, at most n - 1 when n >= 2
    assert np.bincount(labels[held], minlength=5).tolist() == [2, 1, 1, 1, 3]
    assert np.bincount(labels[keep], minlength=5).tolist() == [8, 4, 0, 1, 10]
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(len(labels)))
    again = D.per_class_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(held, again[1])
    others = {tuple(D.per_class_split(labels, 0.2, seed=s)[1]) for s in range(5)}
    assert len(others) > 1
    with pytest.raises(ValueError):
        D.per_class_split(labels, 1.0, 0)


def test_balanced_subset():
    labels = np.repeat([0, 1, 2], [50, 50, 3])
    idx = D.balanced_subset(labels, 30, seed=1)
    assert np.bincount(labels[idx]).tolist() == [10, 10, 3]
    assert D.balanced_subset(labels, 1000, 0).tolist() == list(range(103))


# ---- ImageFolder --------------------------------------------------------------------------------
def write_tree(root: Path, classes=("cat", "dog", "eel"), n=5, size=8, ext=".png", seed=0):
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}{ext}")
    return root


def test_image_folder_train_test(tmp_path):
    write_tree(tmp_path / "ds" / "train", n=4)
    write_tree(tmp_path / "ds" / "test", classes=("cat", "eel"), n=2)
    (tmp_path / "ds" / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "ds" / "train" / "cat" / ".hidden.png").write_bytes(b"")
    parts = D.load_image_folder(tmp_path / "ds")
    assert parts["train"].class_names == ["cat", "dog", "eel"]
    assert len(parts["train"]) == 12 and len(parts["test"]) == 4
    assert sorted(set(parts["test"].labels.tolist())) == [0, 2]
    assert all(p.endswith(".png") for p in parts["train"].items)
    ds = D.ImageFolderDataset(tmp_path / "ds", "test", transform=lambda im: im.size)
    assert ds[0] == ((8, 8), 0) and ds.classes == ["cat", "dog", "eel"]


def test_image_folder_val_merged_into_trainval(tmp_path):
    write_tree(tmp_path / "ds" / "train", n=3)
    write_tree(tmp_path / "ds" / "val", n=2, seed=1)
    write_tree(tmp_path / "ds" / "test", n=1, seed=2)
    parts = D.load_image_folder(tmp_path / "ds")
    assert len(parts["train"]) == 15 and len(parts["test"]) == 3
    write_tree(tmp_path / "tv" / "trainval", n=3)
    write_tree(tmp_path / "tv" / "val", n=2)
    parts = D.load_image_folder(tmp_path / "tv")  # val is the test side when there is no test/
    assert len(parts["train"]) == 9 and len(parts["test"]) == 6


def test_image_folder_single_tree_seeded_split(tmp_path):
    write_tree(tmp_path / "one", n=10)
    a = D.load_image_folder(tmp_path / "one", test_fraction=0.3, seed=4)
    b = D.load_image_folder(tmp_path / "one", test_fraction=0.3, seed=4)
    assert np.bincount(a["test"].labels).tolist() == [3, 3, 3]
    assert a["test"].items == b["test"].items
    assert not set(a["test"].items) & set(a["train"].items)
    sub = D.load_image_folder(tmp_path / "one", classes=["eel", "cat"])
    assert sub["train"].class_names == ["eel", "cat"]
    assert all("/eel/" in p for p, y in zip(sub["train"].items, sub["train"].labels) if y == 0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DatasetNotFoundError, match="does not exist"):
        D.load_image_folder(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(D.DatasetNotFoundError, match="no class folder"):
        D.load_image_folder(tmp_path / "empty")
    write_tree(tmp_path / "half" / "train")
    with pytest.raises(D.DatasetNotFoundError, match="partner"):
        D.load_image_folder(tmp_path / "half")
    write_tree(tmp_path / "odd" / "train", classes=("a",))
    write_tree(tmp_path / "odd" / "test", classes=("a", "zzz"))
    with pytest.raises(D.DatasetFormatError, match="zzz"):
        D.load_image_folder(tmp_path / "odd")


# ---- torchvision sets ---------------------------------------------------------------------------
def test_torchvision_names_and_missing_files(tmp_path):
    assert D.torchvision_dataset_name("FGVC_Aircraft") == "aircraft"
    assert D.torchvision_dataset_name("oxford-iiit-pet") == "pets"
    assert D.torchvision_dataset_name("imagenet") is None
    for name in ("dtd", "eurosat", "pets", "aircraft"):
        with pytest.raises(D.DatasetNotFoundError, match="never downloads"):
            D.load_torchvision_dataset(name, tmp_path)
    with pytest.raises(D.DatasetNotFoundError, match="does not exist"):
        D.load_torchvision_dataset("dtd", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown"):
        D.load_torchvision_dataset("mnist", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_torchvision_eurosat_layout_gets_seeded_split(tmp_path):
    # EuroSAT is an ImageFolder under root/eurosat/2750/<class>/*.jpg
    write_tree(tmp_path / "eurosat" / "2750", classes=("Forest", "River"), n=5, ext=".jpg")
    parts = D.load_torchvision_dataset("eurosat", tmp_path, test_fraction=0.2, seed=0)
    assert len(parts["train"]) == 8 and len(parts["test"]) == 2
    assert parts["train"].class_names == ["Forest", "River"]


def test_torchvision_pets_layout_lists_trainval_and_test(tmp_path):
    """OxfordIIITPet keeps its files in ``_images`` (not ``_image_files``): every pets root
    was refused with "cannot list the images of OxfordIIITPet"."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    names = {"trainval": ["Abyssinian_1", "Abyssinian_2", "basset_hound_1", "basset_hound_2"],
             "test": ["Abyssinian_3", "basset_hound_3"]}
    for split, ids in names.items():
        (base / "annotations" / f"{split}.txt").write_text("".join(
            f"{i} {1 if i.startswith('Aby') else 2} {1 if i.startswith('Aby') else 2} 1\n"
            for i in ids))
        for i in ids:
            Image.new("RGB", (8, 8), (40, 80, 120)).save(base / "images" / f"{i}.jpg")
    parts = D.load_torchvision_dataset("pets", tmp_path)
    assert [Path(p).stem for p in parts["train"].paths] == names["trainval"]
    assert [Path(p).stem for p in parts["test"].paths] == names["test"]
    assert list(parts["train"].labels) == [0, 0, 1, 1] and list(parts["test"].labels) == [0, 1]
    assert parts["train"].class_names == ["Abyssinian", "Basset Hound"]


def test_gzip_reader_matches_debian_layout_names(tmp_path):
    write_fmnist(tmp_path)
    imgs, labs = D.fashion_mnist_files(tmp_path, "test")
    assert imgs.name == "t10k-images-idx3-ubyte.gz" and labs.name == "t10k-labels-idx1-ubyte.gz"
    with gzip.open(imgs) as fh:
        assert fh.read(4) == bytes([0, 0, 8, 3])
