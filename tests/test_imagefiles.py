"""One home for image files: the extensions, the folder walk, and trex-extract's inputs.

``trex-extract`` and ``trex-eval --format imagefolder`` must see the same files of a folder."""
import os

import pytest

from trex_hub.cli import extract as extract_cli
from trex_hub.datasets import load_image_folder
from trex_hub.evaluation.runner import DataOptions, load_image_dataset
from trex_hub.imagefiles import IMAGE_EXTENSIONS, collect_inputs, is_image, walk_images


def touch(root, *rels):
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


# images that both programs must list, and files that neither may list
IMAGES = ("cat/a.JPG", "cat/b.jpeg", "cat/nested/deep/c.Png", "cat/x.TIFF", "cat/y.webp",
          "cat/z.jfif", "dog/1.png", "dog/2.JPEG", "dog/sub.with.dots/3.bmp", "dog/4.Tga",
          "eel/e1.gif", "eel/e2.ppm", "eel/e3.ico")
NOT_IMAGES = ("cat/.hidden.jpg", "cat/._a.JPG", "cat/notes.txt", "cat/noext", "cat/jpg",
              "cat/.ipynb_checkpoints/a-checkpoint.jpg", "dog/.cache/d.png", ".git/objects/o.png",
              "eel/e4.jpg.part", "eel/archive.tar.gz")


def extract_paths(*argv):
    """The files trex-extract would read, from its own command line parsing."""
    args = extract_cli.build_parser().parse_args(["m", *map(str, argv), "-o", "x.npy"])
    return [e.path for e in extract_cli.collect(args)]


def test_extract_and_eval_list_the_same_files_of_one_tree(tmp_path):
    root = tmp_path / "tree"
    touch(root, *IMAGES, *NOT_IMAGES)
    by_extract = extract_paths(root)
    parts = load_image_dataset(DataOptions("imagefolder", str(root), test_fraction=0.3))
    by_eval = list(parts["train"].items) + list(parts["test"].items)
    assert sorted(by_extract) == sorted(by_eval) == sorted(str(root / r) for r in IMAGES)
    assert len(set(by_eval)) == len(by_eval)


def test_extract_and_eval_list_the_same_files_of_train_and_test(tmp_path):
    root = tmp_path / "split"
    for side in ("train", "test"):
        touch(root / side, *IMAGES, *NOT_IMAGES)
    parts = load_image_dataset(DataOptions("imagefolder", str(root)))
    for side in ("train", "test"):
        # same files in the same order (class folders in sorted order, files by relative path)
        assert extract_paths(root / side) == list(parts[side].items)
    assert parts["train"].class_names == ["cat", "dog", "eel"]


def test_walk_order_hidden_and_links(tmp_path):
    root = tmp_path / "r"
    touch(root, "b/2.jpg", "b/10.jpg", "a/x.PNG", ".a/h.jpg", "a/.h.jpg", "c.bmp")
    os.symlink(root, root / "b" / "loop")  # a link back up is not followed again
    os.symlink(root / "a", root / "linked")  # a second path to a folder already listed: once
    os.symlink(tmp_path / "elsewhere", root / "z")  # a link to a folder outside is followed
    touch(tmp_path / "elsewhere", "e.jpg")
    rels = [rel for rel, _ in walk_images(root)]
    assert rels == ["a/x.PNG", "b/10.jpg", "b/2.jpg", "c.bmp", "z/e.jpg"]
    assert walk_images(root, ["bmp"]) == [("c.bmp", str(root / "c.bmp"))]


def test_is_image_and_extensions():
    assert "jpg" in IMAGE_EXTENSIONS and all(not e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert is_image("a/b.JPEG") and is_image("x.webp") and not is_image("x.txt")
    assert not is_image("jpg") and not is_image("a.jpg.part")
    assert is_image("x.foo", [".FOO"]) and not is_image("x.jpg", ["png"])


def test_image_folder_sees_what_collect_inputs_sees(tmp_path):
    """datasets.load_image_folder and collect_inputs share the walk: same files per class."""
    root = tmp_path / "t"
    touch(root, *IMAGES, *NOT_IMAGES)
    parts = load_image_folder(root, test_fraction=0.5)
    labels = {e.path: e.label for e in collect_inputs([root], labels="folder")}
    for part in parts.values():
        for path, y in zip(part.items, part.labels):
            top = os.path.relpath(path, root).split(os.sep)[0]
            assert part.class_names[y] == top and path in labels


def test_collect_inputs_orders(tmp_path):
    for rel in ("b/2.jpg", "b/10.jpg", "a/x.PNG", "a/sub/y.jpeg", "a/notes.txt", "c.bmp"):
        p = tmp_path / "root" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    entries = collect_inputs([tmp_path / "root"], labels="folder")
    assert [e.rel for e in entries] == ["a/sub/y.jpeg", "a/x.PNG", "b/10.jpg", "b/2.jpg", "c.bmp"]
    assert [e.label for e in entries] == ["sub", "a", "b", "b", "root"]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nroot/c.bmp\troad\n\nroot/b/2.jpg\n")
    entries = collect_inputs([lst, tmp_path / "root" / "a" / "x.PNG"],
                             extensions=["png", "jpg"])
    assert [(e.rel, e.label) for e in entries] == [("root/c.bmp", "road"), ("root/b/2.jpg", None),
                                                   (str(tmp_path / "root/a/x.PNG"), None)]
    assert entries[0].path == str(tmp_path / "root" / "c.bmp")
    with pytest.raises(FileNotFoundError):
        collect_inputs([tmp_path / "missing"])


def test_a_list_saved_with_a_byte_order_mark_reads_its_first_path(tmp_path):
    """Windows Notepad starts a UTF-8 file with a BOM (and ends lines with CRLF): the BOM is
    not part of the first path."""
    touch(tmp_path, "a.png", "b.png")
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfa.png\r\nb.png\tlabel\r\n")
    entries = collect_inputs([lst])
    assert [(e.rel, e.label) for e in entries] == [("a.png", None), ("b.png", "label")]
    assert all(os.path.isfile(e.path) for e in entries)
