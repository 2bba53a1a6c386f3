"""torchrun sharding: 2 CPU processes on gloo produce the same merged output as one process."""
import os
import subprocess
import sys
from pathlib import Path

import factories as fx
import numpy as np
import pytest
import torch
from PIL import Image

from trex_hub.cli.extract import main
from trex_hub import read_features
from test_extract import photos

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    ckpt = tmp_path / "r18.pth"
    fx.write_backbone_file(ckpt, arch="resnet18", seed=11)
    data = tmp_path / "imgs"
    for i, a in enumerate(photos(22, (30, 26), seed=2)):
        cls = data / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(cls / f"{i:02d}.png")
    (data / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    # 23 inputs in chunks of 4: 6 chunks, rank 0 takes 0, 2, 4 and rank 1 takes 1, 3, 5
    opts = ["-b", "2", "--chunk-size", "4", "--labels", "folder", "--no-progress"]
    (tmp_path / "tmp").mkdir()  # torchrun's own temporary folders, not left in /tmp
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"))
    dist_out = tmp_path / "dist.npy"
    res = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m",
                          "trex_hub.cli.extract", str(ckpt), str(data), "-o", str(dist_out),
                          *opts], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stderr and "[22 x 512], 1 failed" in res.stderr
    assert not (tmp_path / "dist.npy.parts").exists()

    single_out = tmp_path / "single.npy"
    threads = torch.get_num_threads()
    try:
        assert main([str(ckpt), str(data), "-o", str(single_out), *opts, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, rows_a = read_features(dist_out)
    b, rows_b = read_features(single_out)
    assert rows_a == rows_b and a.shape == (22, 512)
    assert [r["path"] for r in rows_a] == sorted(r["path"] for r in rows_a)
    assert np.array_equal(a, b)
