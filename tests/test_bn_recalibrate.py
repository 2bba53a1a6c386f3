"""benchmarks/bn_recalibrate.py: BatchNorm statistics re-estimated on clean images, weights kept."""
import sys
from pathlib import Path

import numpy as np
import torch

import trex_hub
from trex_hub import datasets as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bn_recalibrate  # noqa: E402


def test_recalibrate_is_the_mean_of_batch_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    for bn in (net[1], net[4]):  # stale statistics, as after multi-crop training
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    images = np.random.default_rng(0).integers(0, 255, (8, 10, 10, 3), dtype=np.uint8)

    def tf(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

    assert bn_recalibrate.recalibrate(net, list(images), tf, batch_size=4) == 2
    assert not net.training
    x = torch.stack([tf(i) for i in images])
    with torch.no_grad():
        h = net[0](x)
    means = [h[:4].mean((0, 2, 3)), h[4:].mean((0, 2, 3))]
    vars_ = [h[:4].var((0, 2, 3), unbiased=True), h[4:].var((0, 2, 3), unbiased=True)]
    torch.testing.assert_close(net[1].running_mean, (means[0] + means[1]) / 2)
    torch.testing.assert_close(net[1].running_var, (vars_[0] + vars_[1]) / 2)
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_main_writes_a_loadable_model_with_new_statistics(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        D.write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28),
                                                                       dtype=np.uint8))
        D.write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    src = trex_hub.save_pretrained(trex_hub.load("trex", pretrained=False), tmp_path / "src")
    out = tmp_path / "out"
    assert bn_recalibrate.main([str(src), str(out), "--data", str(root), "--classes", "0-4",
                                "--limit", "10", "--image-size", "32"]) == 0
    before, after = trex_hub.load(src), trex_hub.load(out)
    sb, sa = before.state_dict(), after.state_dict()
    assert sb.keys() == sa.keys()
    changed = [k for k in sb if not torch.equal(sb[k], sa[k])]
    assert changed and all("running_" in k or "num_batches" in k for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
