"""The neighbours picture: trex_hub.viz, `trex-eval neighbours` and the demo's PNG."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import factories as fx  # noqa: E402
from PIL import Image  # noqa: E402

from trex_hub.cli.eval import main as eval_main  # noqa: E402
from trex_hub.cli.extract import main as extract_main  # noqa: E402
from trex_hub.viz import nearest_neighbours, neighbours_figure  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
PHOTOS = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))


def test_nearest_neighbours_rank_by_cosine_and_skip_self():
    feats = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.5]])
    idx, scores = nearest_neighbours(feats, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    assert scores[0, 0] == pytest.approx(10 / np.sqrt(101))  # cosine, not dot product
    assert np.all(np.diff(scores, axis=1) <= 0)
    with pytest.raises(ValueError, match="pick k from 1 to 3"):
        nearest_neighbours(feats, 4)
    with pytest.raises(ValueError, match="N >= 2"):
        nearest_neighbours(feats[:1], 1)


def test_figure_is_a_grid_of_queries_and_neighbours(tmp_path):
    feats = np.random.default_rng(0).normal(size=(len(PHOTOS), 8))
    out = neighbours_figure([str(p) for p in PHOTOS], feats, tmp_path / "a" / "grid.png", k=2,
                            queries=[0, 3], title="t", dpi=50)
    with Image.open(out) as img:
        w, h = img.size
    # 3 columns (query + 2) of 2.1 in, 2 rows of 2.45 in (+ title), at 50 dpi
    assert (w, h) == (round(3 * 2.1 * 50), round((2 * 2.45 + 0.5) * 50))
    with pytest.raises(ValueError, match="one image per row"):
        neighbours_figure([str(PHOTOS[0])], feats, tmp_path / "b.png")
    with pytest.raises(ValueError, match="outside 0..4"):
        neighbours_figure([str(p) for p in PHOTOS], feats, tmp_path / "b.png", queries=[7])
    assert not (tmp_path / "b.png").exists()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=2)
    return path


def test_trex_eval_neighbours_on_a_trex_extract_output(ckpt, tmp_path, capsys):
    data = tmp_path / "photos"
    for i, p in enumerate(PHOTOS):
        (data / ("colour" if p.suffix == ".jpg" else "grey")).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, data / ("colour" if p.suffix == ".jpg" else "grey") / p.name)
    feats = tmp_path / "feats.npy"
    assert extract_main([str(ckpt), str(data), "-o", str(feats), "--labels", "folder",
                         "--no-progress", "-q", "-b", "2"]) == 0
    assert eval_main(["neighbours", str(feats), "--images", str(data), "--out",
                      str(tmp_path / "grid.png"), "-k", "2", "--queries", "3"]) == 0
    assert "3 queries x 2 neighbours" in capsys.readouterr().err
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (round(3 * 2.1 * 100), round((3 * 2.45 + 0.5) * 100))
    # --images defaults to trex-extract's single input, read from the meta file
    assert json.loads((tmp_path / "feats.npy.meta.json").read_text())["inputs"] == [str(data)]
    assert eval_main(["neighbours", str(feats), "--out", str(tmp_path / "g2.png")]) == 0
    capsys.readouterr()
    # a wrong --images is one actionable line
    assert eval_main(["neighbours", str(feats), "--images", str(tmp_path), "--out",
                      str(tmp_path / "g3.png")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "pass --images" in err and len(err.strip().splitlines()) == 1


def test_demo_writes_the_neighbours_png(ckpt, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", REPO / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo_neighbours.png"
    assert demo.main(["--model", str(ckpt), "--neighbours", str(out)]) == 0
    assert f"nearest neighbours: {out}" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] == round(4 * 2.1 * 100)  # query + 3
