"""The features file and the resumable run behind trex-extract: formats, chunks, options."""
import errno
import json
import threading

import factories as fx
import numpy as np
import pytest
from PIL import Image

import trex_hub
from trex_hub import extract_run
from trex_hub.extract_run import RunOptions, extract_to_file
from trex_hub.featurefile import ExtractError, read_features
from trex_hub.imagefiles import collect_inputs
from test_extract import photos, rel_err


@pytest.fixture(scope="module")
def r18_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=4)
    return path


def test_read_features_all_formats(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    for i, a in enumerate(photos(3)):
        Image.fromarray(a).save(folder / "a" / f"{i}.png")
    (folder / "a" / "zz_bad.jpg").write_bytes(b"")
    entries = collect_inputs([folder], labels="folder")
    results = {}
    for fmt in (".npy", ".safetensors", ".pt"):
        s = extract_to_file(model, entries, tmp_path / f"f{fmt}", batch_size=2, chunk_size=2)
        assert (s.ok, s.failed, s.total) == (3, 1, 4)
        # the batch loop is timed on its own, inside the whole run (which adds the one-off steps)
        assert 0 < s.loop_seconds < s.seconds
        assert s.loop_images_per_second > s.images_per_second
        assert not (tmp_path / f"f{fmt}.parts").exists()
        results[fmt] = read_features(tmp_path / f"f{fmt}")
    feats, rows = results[".npy"]
    assert feats.dtype == np.float32 and feats.shape == (3, 512)
    assert [r["path"] for r in rows] == ["a/0.png", "a/1.png", "a/2.png", "a/zz_bad.jpg"]
    assert [r["index"] for r in rows] == [0, 1, 2, None]
    assert rows[3]["status"] == "failed" and "empty file" in rows[3]["error"]
    assert all(r["label"] == "a" for r in rows)
    for fmt in (".safetensors", ".pt"):
        assert np.array_equal(results[fmt][0], feats) and results[fmt][1] == rows
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(str(tmp_path / "f.safetensors"))["features"], feats)
    want = model.extract([folder / "a" / f"{i}.png" for i in range(3)]).numpy()
    assert rel_err(feats, want) < 1e-5


def _six_photos(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(photos(6, (40, 40))):
        Image.fromarray(a).save(folder / f"{i}.png")
    return collect_inputs([folder])


def test_chunks_are_committed_while_running(r18_path, tmp_path, monkeypatch):
    """Memory stays flat: chunk files appear before the run ends."""
    model, entries = trex_hub.load(r18_path), _six_photos(tmp_path)
    seen = []
    real_write = extract_run.write_segment

    def spy(parts, start, stop, feats, rows):
        seen.append((start, stop, feats.shape[0],
                     sorted(p.name for p in parts.glob("part-*.jsonl"))))
        assert threading.current_thread().name == "trex-extract-writer"  # not the loop's
        real_write(parts, start, stop, feats, rows)

    monkeypatch.setattr(extract_run, "write_segment", spy)
    extract_to_file(model, entries, tmp_path / "o.npy", batch_size=2, chunk_size=2,
                    normalize=True, num_workers=2)
    assert [(a, b, n) for a, b, n, _ in seen] == [(0, 2, 2), (2, 4, 2), (4, 6, 2)]
    assert seen[2][3] == ["part-0000000000-0000000002.jsonl", "part-0000000002-0000000004.jsonl"]
    feats, _ = read_features(tmp_path / "o.npy")
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)


def test_a_failed_segment_write_stops_the_run_and_resume_finishes_it(r18_path, tmp_path,
                                                                     monkeypatch):
    model, entries = trex_hub.load(r18_path), _six_photos(tmp_path)
    real_write = extract_run.write_segment

    def full_disk(parts, start, stop, feats, rows):
        if start == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(parts))
        real_write(parts, start, stop, feats, rows)

    monkeypatch.setattr(extract_run, "write_segment", full_disk)
    opts = dict(batch_size=2, chunk_size=2, num_workers=0)
    with pytest.raises(ExtractError, match="No space left on device.*rerun with --resume"):
        extract_to_file(model, entries, tmp_path / "o.npy", **opts)
    parts = tmp_path / "o.npy.parts"
    assert sorted(p.name for p in parts.glob("part-*.jsonl")) == [
        "part-0000000000-0000000002.jsonl"]  # written before the failure; none after it
    monkeypatch.setattr(extract_run, "write_segment", real_write)
    extract_to_file(model, entries, tmp_path / "o.npy", resume=True, **opts)
    extract_to_file(model, entries, tmp_path / "ref.npy", **opts)
    assert np.array_equal(read_features(tmp_path / "o.npy")[0],
                          read_features(tmp_path / "ref.npy")[0])


def test_write_behind_keeps_order_and_hands_errors_back():
    from trex_hub.fileio import WriteBehind

    done = []
    w = WriteBehind()
    for k in range(5):
        w.submit(lambda k=k: done.append(k))
    w.close()
    assert done == [0, 1, 2, 3, 4]

    def boom():
        raise OSError(errno.EIO, "I/O error")

    w = WriteBehind()
    w.submit(boom)
    w.submit(lambda: done.append("after"))  # may be taken before the failure is seen...
    with pytest.raises(OSError, match="I/O error"):
        w.close()
    assert "after" not in done  # ...but is dropped: nothing is written after a failure
    w = WriteBehind()
    w.submit(boom)
    w.close(raise_error=False)  # on the way out of another error: that one is what counts


def _folder(tmp_path, n=7):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(photos(n, (32, 32), seed=3)):
        Image.fromarray(a).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"")  # one failure, inside the second chunk
    return collect_inputs([folder])


def test_options_object_and_keywords_are_one_thing(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    entries = _folder(tmp_path)
    opts = RunOptions(batch_size=2, chunk_size=3, num_workers=0)
    a = extract_to_file(model, entries, tmp_path / "a.npy", opts)
    b = extract_to_file(model, entries, tmp_path / "b.npy", batch_size=2, chunk_size=3,
                        num_workers=0)
    assert (a.ok, a.failed) == (b.ok, b.failed) == (6, 1)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    with pytest.raises(TypeError):
        extract_to_file(model, entries, tmp_path / "c.npy", opts, no_such_option=1)
    with pytest.raises(ValueError, match="chunk_size"):
        extract_to_file(model, entries, tmp_path / "c.npy", opts, chunk_size=0)


def test_plan_resumes_only_the_chunks_not_committed(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    entries = _folder(tmp_path)
    out = tmp_path / "f.npy"
    opts = RunOptions(batch_size=2, chunk_size=3, num_workers=0, keep_parts=True)
    extract_to_file(model, entries, out, opts)
    reference = out.read_bytes(), (tmp_path / "f.npy.manifest.jsonl").read_text()
    # as if killed while computing chunk 1 of 0..3 (chunk_size rounds up to 4: chunks 0 and 1)
    parts = tmp_path / "f.npy.parts"
    assert json.loads((parts / "state.json").read_text())["chunk_size"] == 4
    (parts / "part-0000000004-0000000007.jsonl").unlink()
    for p in (out, tmp_path / "f.npy.manifest.jsonl", tmp_path / "f.npy.meta.json"):
        p.unlink()
    plan = extract_run.plan_run(model, entries, out, RunOptions(batch_size=2, chunk_size=3,
                                                                 resume=True))
    assert (plan.n_chunks, plan.mine, plan.batch_size) == (2, [1], 2)
    assert [list(g) for g in plan.batches(len(entries))] == [[4, 5], [6]]
    plan.close()
    with pytest.raises(ExtractError, match="unfinished run"):
        extract_to_file(model, entries, out, opts, keep_parts=False)
    s = extract_to_file(model, entries, out, opts, resume=True, keep_parts=False)
    assert s.computed == 3 and (s.ok, s.failed) == (6, 1)
    assert (out.read_bytes(), (tmp_path / "f.npy.manifest.jsonl").read_text()) == reference
    assert not parts.exists()


def test_steps_shard_chunks_across_ranks(r18_path, tmp_path):
    """Two ranks driven step by step in one process give the single-process file."""
    model = trex_hub.load(r18_path)
    entries = _folder(tmp_path, n=9)
    opts = RunOptions(batch_size=2, chunk_size=2, num_workers=0)
    extract_to_file(model, entries, tmp_path / "one.npy", opts)
    out = tmp_path / "two.npy"
    shards = [extract_run.Shard(rank, 2) for rank in (0, 1)]
    plans = [extract_run.plan_run(model, entries, out, opts, shard) for shard in shards]
    assert [p.mine for p in plans] == [[0, 2, 4], [1, 3]]
    dims = [extract_run.run_chunks(model, entries, p, opts, s)[2] for p, s in zip(plans, shards)]
    assert dims == [512, 512]
    assert extract_run.finish_run(plans[0], opts, 512, len(entries), 2) == (8, 1)
    assert out.read_bytes() == (tmp_path / "one.npy").read_bytes()
    assert json.loads((tmp_path / "two.npy.meta.json").read_text())["world_size"] == 2
