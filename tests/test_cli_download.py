"""``trex-download``: every flag, exit codes 0/1/2, against a mirror on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trex_hub
from http_server import FileServer, HubServer
from trex_hub.cli.download import main
from trex_hub.hub import download as dl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def mirror(released_files, monkeypatch):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        yield srv


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"  # conftest points TREX_HUB_CACHE here


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table_and_json(mirror, capsys, cache):
    code, out, err = run(capsys, "--list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "top-1", "log-odds", "projector", "size", "cached"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert sorted(rows) == trex_hub.list_models()
    assert "80.2" in rows["trex_star"] and "0.8829" in rows["trex_star"]
    assert " no " in rows["trex_star"] and "full: no" in rows["trex_star_repro"]
    assert run(capsys, "trex_star", "-q")[0] == 0
    code, out, _ = run(capsys, "--list", "--json")
    data = {r["name"]: r for r in json.loads(out)}
    star = data["trex_star"]["files"][0]
    assert star["cached"] and star["size"] == (cache / "trexstar.pth").stat().st_size
    assert star["sha256"] == dl.sha256_of(cache / "trexstar.pth")
    assert data["trex_repro"]["has_projector"] and not data["trex"]["has_projector"]
    assert not data["trex"]["files"][0]["cached"]
    code, out, _ = run(capsys, "--list")
    [star_row] = [ln for ln in out.splitlines() if ln.startswith("trex_star ")]
    assert "MiB" in star_row and " yes" in star_row


def test_download_named_models_and_aliases(mirror, capsys, cache):
    code, out, err = run(capsys, "t-ReX*", "trex")
    assert code == 0, err
    assert out.split() == [str(cache / "trexstar.pth"), str(cache / "trex.pth")]
    assert dl.read_manifest(cache / "trex.pth")["size"] == (cache / "trex.pth").stat().st_size
    n = len(mirror.requests)
    assert run(capsys, "trex_star")[0] == 0 and len(mirror.requests) == n  # cached


def test_all_full_quiet_and_cache_dir(mirror, capsys, tmp_path):
    target = tmp_path / "elsewhere"
    code, out, err = run(capsys, "--all", "--full", "--quiet", "--cache-dir", str(target))
    assert code == 0 and out == "" and err == ""
    expected = {"trex.pth", "trexstar.pth", "trex_2.pth", "trexstar_2.pth",
                "trex_2_checkpoint_full.pth", "trexstar_2_checkpoint_full.pth"}
    assert {p.name for p in target.iterdir() if p.suffix == ".pth"} == expected
    code, out, _ = run(capsys, "--list", "--json", "--cache-dir", str(target))
    assert all(f["cached"] for r in json.loads(out) for f in r["files"])


def test_full_on_a_backbone_only_model_says_so(mirror, capsys):
    code, _, err = run(capsys, "trex", "--full")
    assert code == 0 and "no full training checkpoint is released" in err


def test_base_url_flag(released_files, capsys, cache, monkeypatch):
    monkeypatch.setenv("TREX_HUB_BASE_URL", "http://127.0.0.1:9/")  # dead: the flag wins
    with FileServer(released_files) as srv:
        code, _, err = run(capsys, "trex", "--base-url", srv.url)
        assert code == 0, err
        assert len(srv.gets("trex.pth")) == 1


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "name at least one MODEL" in err
    code, _, err = run(capsys, "trex_sta")
    assert code == 2 and "Did you mean 'trex_star'" in err and len(err.strip().splitlines()) == 1
    assert run(capsys, "--no-such-flag")[0] == 2
    code, _, err = run(capsys, "trex", "--json")
    assert code == 2 and "--json goes with --list or --verify" in err
    assert run(capsys, "--help")[0] == 0


def test_failures_exit_1_with_one_line_naming_url_and_fix(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with FileServer(empty) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        code, out, err = run(capsys, "trex_star")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert srv.url + "trexstar.pth" in err and "HTTP 404" in err and "TREX_HUB_BASE_URL" in err


def test_offline_flag_cold_and_warm(mirror, capsys, cache):
    code, out, err = run(capsys, "trex_star", "--offline")
    assert code == 1 and "not cached" in err and "trex-download trex_star" in err
    assert mirror.requests == []
    assert run(capsys, "trex_star")[0] == 0
    n = len(mirror.requests)
    code, out, _ = run(capsys, "trex_star", "--offline")
    assert code == 0 and out.strip() == str(cache / "trexstar.pth") and len(mirror.requests) == n


def test_verify_catches_a_file_corrupted_on_disk(mirror, capsys, cache):
    code, out, _ = run(capsys, "--verify")
    assert code == 0 and "nothing cached" in out
    assert run(capsys, "trex", "trex_star", "-q")[0] == 0
    code, out, err = run(capsys, "--verify")
    assert code == 0 and out.count("ok ") == 2 and err == ""
    bad = cache / "trex.pth"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only a re-hash sees it
    bad.write_bytes(bytes(data))
    code, out, err = run(capsys, "--verify", "--json")
    report = json.loads(out)
    assert code == 1 and report["mismatches"] == 1
    [broken] = [f for f in report["files"] if not f["ok"]]
    assert broken["file"] == str(bad) and "manifest recorded" in broken["problem"]
    assert not bad.exists() and dl.manifest_path(bad).exists()
    assert run(capsys, "--verify", "trex_star")[0] == 0
    # downloading again restores it, checked against the manifest of the first download
    assert run(capsys, "trex", "-q")[0] == 0
    code, out, err = run(capsys, "--verify")
    assert code == 0 and out.count("ok ") == 2


def test_verify_reports_mismatch_in_text(mirror, capsys, cache):
    run(capsys, "trex", "-q")
    (cache / "trex.pth").write_bytes(b"short")
    code, out, err = run(capsys, "--verify")
    assert code == 1 and "MISMATCH" in err and "size 5 bytes" in err and "deleted" in err


def test_to_safetensors_exports_loadable_folders(mirror, capsys, tmp_path):
    out_dir = tmp_path / "exported"
    code, out, err = run(capsys, "trex_star_repro", "--full", "--to-safetensors", str(out_dir))
    assert code == 0, err
    folder = out_dir / "trex_star_repro"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json",
                                                  "README.md"}
    exported = trex_hub.load(folder, projector=True)
    direct = trex_hub.load("trex_star_repro", projector=True, progress=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(x), direct(x))
        assert torch.equal(exported.forward_logits(x), direct.forward_logits(x))
    assert "CC BY-NC-SA 4.0" in (folder / "README.md").read_text()
    code, _, _ = run(capsys, "trex_star", "-q", "--to-safetensors", str(out_dir))
    assert code == 0 and not trex_hub.load(out_dir / "trex_star").has_projector


def test_hf_hub_ids(capsys, tmp_path, monkeypatch):
    model = trex_hub.TReX("resnet18", name="tiny").eval()
    folder = trex_hub.save_pretrained(model, tmp_path / "tiny")
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url.rstrip("/"))
        sha = hub.add("org/tiny", {n: (folder / n).read_bytes()
                                   for n in ("config.json", "model.safetensors", "README.md")})
        hf_cache = tmp_path / "hf"
        code, out, err = run(capsys, "hf-hub:org/tiny", "--cache-dir", str(hf_cache))
        assert code == 0, err
        assert out.strip() == str(hf_cache / "models--org--tiny" / "snapshots" / sha)
        code, out, err = run(capsys, "hf-hub:org/none", "--cache-dir", str(hf_cache))
        assert code == 1 and "repository not found" in err
        n = len(hub.log)
        code, out, _ = run(capsys, "hf-hub:org/tiny", "--offline", "--cache-dir", str(hf_cache),
                           "--to-safetensors", str(tmp_path / "conv"))
        assert code == 0 and len(hub.log) == n
    assert (tmp_path / "conv" / "org--tiny" / "model.safetensors").is_file()


def test_hf_hub_repos_are_checked_on_download_and_verified_by_blob_name(capsys, tmp_path,
                                                                        monkeypatch):
    """A repo load() would refuse fails its pre-fetch (not later, on the offline machine), and
    --verify re-hashes the Hugging Face cache's blobs instead of checking nothing."""
    model = trex_hub.TReX("resnet18", name="tiny").eval()
    folder = trex_hub.save_pretrained(model, tmp_path / "tiny")
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url.rstrip("/"))
        hub.add("org/tiny", {n: (folder / n).read_bytes()
                             for n in ("config.json", "model.safetensors")})
        hub.add("org/bad", {"config.json": (folder / "config.json").read_bytes(),
                            "model.safetensors": b"not safetensors at all"})
        hf_cache = tmp_path / "hf"
        code, out, err = run(capsys, "hf-hub:org/bad", "--cache-dir", str(hf_cache))
        assert code == 1 and out == "" and "not a readable safetensors file" in err
        code, out, err = run(capsys, "hf-hub:org/tiny", "--cache-dir", str(hf_cache))
        assert code == 0, err
        code, out, err = run(capsys, "--verify", "hf-hub:org/tiny", "hf-hub:org/none",
                             "--cache-dir", str(hf_cache))
        assert code == 0 and out.count("ok        ") == 2 and "model.safetensors" in out
        assert "not cached: hf-hub:org/none" in err
        weights = Path(out.strip().splitlines()[1].split()[1])
        blob = weights.resolve()
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # a flipped byte on disk
        code, out, err = run(capsys, "--verify", "hf-hub:org/tiny", "--cache-dir", str(hf_cache))
        assert code == 1 and "MISMATCH" in err and not blob.exists() and not weights.exists()
        n = len(hub.log)
        code, out, err = run(capsys, "hf-hub:org/tiny", "--cache-dir", str(hf_cache))
        assert code == 0 and len(hub.log) > n and weights.read_bytes() == (
            folder / "model.safetensors").read_bytes()


def test_to_destinations_are_checked_before_any_download(mirror, capsys, tmp_path, cache):
    """A --to-* destination that cannot be written is one usage line naming the option and the
    fix, before anything is downloaded (it was a raw errno line after the download, and an
    empty DIR silently exported nothing)."""
    a_file = tmp_path / "trex_star.onnx"
    a_file.write_text("an earlier export")
    taken = tmp_path / "taken"
    (taken / "trex_star.onnx").mkdir(parents=True)
    (taken / "trex_star").write_text("not a folder")
    cases = [
        (["--to-onnx", str(a_file)], "--to-onnx takes a folder", "is a file: name a folder"),
        (["--to-onnx", str(tmp_path / "new.onnx")], "--to-onnx takes a folder",
         "looks like a file name"),
        (["--to-timm", str(a_file / "sub")], "--to-timm takes a folder",
         f"'{a_file}' in '{a_file / 'sub'}' is a file"),
        (["--to-safetensors", ""], "--to-safetensors", "must not be empty"),
        (["--to-onnx", str(taken)], "--to-onnx", "is a folder, where the export of trex_star"),
        (["--to-safetensors", str(taken)], "--to-safetensors", "is a file, where the export"),
        (["--to-safetensors", str(tmp_path / "x"), "--to-timm", str(tmp_path / "x")],
         "--to-safetensors and --to-timm name the same folder", "give each its own DIR"),
    ]
    for extra, option, fix in cases:
        code, out, err = run(capsys, "trex_star", *extra)
        assert code == 2, (extra, err)
        line = err.strip().splitlines()[-1]  # argparse's own errors print the usage above it
        assert line.startswith("trex-download: error: ") and option in line and fix in line
        assert err.count("error") == 1 and "Traceback" not in err and out == ""
    assert mirror.requests == [] and not cache.exists()
    assert a_file.read_text() == "an earlier export"


def test_to_onnx_without_the_exporter_fails_before_the_download(mirror, capsys, cache,
                                                                 tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code, out, err = run(capsys, "trex_star", "--to-onnx", str(tmp_path / "onnx"))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "'onnxscript'" in err and "trex_hub[interop]" in err
    assert mirror.requests == [] and not cache.exists()


def test_an_export_into_the_same_folder_again_is_replaced_and_said(mirror, capsys, tmp_path):
    """Re-running --to-* into the same DIR keeps working (scripts do it) and now says that it
    replaced the earlier export, file by file, each atomically."""
    out_dir = tmp_path / "exported"
    code, out, err = run(capsys, "trex", "--to-safetensors", str(out_dir))
    assert code == 0, err
    assert f"wrote {out_dir / 'trex'}\n" in out and "replaced" not in out
    code, out, err = run(capsys, "trex", "--to-safetensors", str(out_dir))
    assert code == 0, err
    assert f"wrote {out_dir / 'trex'} (replaced the existing export)" in out
    assert {p.name for p in (out_dir / "trex").iterdir()} == {"model.safetensors",
                                                             "config.json", "README.md"}
    assert run(capsys, "trex", "-q", "--to-safetensors", str(out_dir)) == (0, "", "")
