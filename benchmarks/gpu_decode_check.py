"""How close GPU (nvJPEG) decoding is to the PIL path, and whether the pipeline races with it.

    python benchmarks/gpu_decode_check.py          # needs CUDA; about 20 s on an H100

On generated photos (the test folder's sizes, 180-500 px, plus 500x375 photos), with a random
ResNet-50 in the released layout, batch 16, it prints the max relative difference of features
against ``decode="cpu"`` (PIL, the exact reference) for:

* ``gpu``: ``decode="gpu"`` as shipped (nvJPEG on a stream of its own, see tensor_decode.py);
* ``gpu, synchronised``: nvJPEG on the caller's stream after a full device synchronisation, which
  rules out any race: the decoder's own difference to libjpeg-turbo;
* ``gpu, caller's stream``: nvJPEG on the caller's stream with kernels of the previous batch still
  queued (the unprotected call), twice: a race shows as a difference between the two runs or NaN;
* pixels: mean / max absolute difference of nvJPEG's RGB to torchvision's CPU ``decode_jpeg``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_decode_check: needs CUDA (nothing measured)", file=sys.stderr)
        return 2
    import trex_hub
    from extract_bench import bench_workdir, make_photos
    from extract_gpu_bench import rel  # NaN anywhere gives NaN
    from torchvision.io import ImageReadMode, decode_jpeg
    from trex_hub import tensor_decode

    work, ckpt = bench_workdir(None, "trex-decode-")
    root = Path(tempfile.mkdtemp(prefix="photos-", dir=work))
    sizes = [(300, 220), (180, 260), (500, 375), (230, 230), (400, 250), (260, 400)]
    for k, size in enumerate(sizes * 4):
        make_photos(root / f"s{k:02d}", 1, size=size, classes=1, seed=k)
    make_photos(root / "big", 48, size=(500, 375), classes=1, seed=99)
    files = sorted(root.rglob("*.jpg"))
    model = trex_hub.load(ckpt)
    shipped = tensor_decode._decode_jpegs

    def on_callers_stream(sync: bool):
        def dec(datas, device):
            if sync:
                torch.cuda.synchronize()
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        return dec

    rows = []
    for precision in ("fp32", "fp16"):
        ref = model.extract(files, device="cuda", decode="cpu", batch_size=16,
                            precision=precision)
        got = {"gpu": model.extract(files, device="cuda", decode="gpu", batch_size=16,
                                    precision=precision)}
        for name, fn in (("gpu, synchronised", on_callers_stream(True)),
                         ("gpu, caller's stream (1)", on_callers_stream(False)),
                         ("gpu, caller's stream (2)", on_callers_stream(False))):
            tensor_decode._decode_jpegs = fn
            try:
                got[name] = model.extract(files, device="cuda", decode="gpu", batch_size=16,
                                          precision=precision)
            finally:
                tensor_decode._decode_jpegs = shipped
        for name, feats in got.items():
            rows.append((precision, name, rel(np.asarray(feats), np.asarray(ref)),
                         rel(np.asarray(feats), np.asarray(got["gpu, synchronised"]))))
    print(f"{len(files)} JPEGs; features: max relative difference")
    print("| precision | decoding | vs PIL path | vs synchronised nvJPEG |")
    print("|---|---|---|---|")
    for precision, name, a, b in rows:
        print(f"| {precision} | {name} | {a:.2e} | {b:.2e} |")
    diffs = []
    for f in files:
        data = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB).int()
        torch.cuda.synchronize()
        gpu = decode_jpeg([data], mode=ImageReadMode.RGB, device="cuda")[0].cpu().int()
        diffs.append(((gpu - cpu).abs().float().mean().item(), (gpu - cpu).abs().max().item()))
    d = np.array(diffs)
    print(f"pixels, nvJPEG vs CPU decode_jpeg: mean abs {d[:, 0].mean():.3f} levels, "
          f"max abs {int(d[:, 1].max())} levels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
