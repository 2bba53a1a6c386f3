"""Issue 10, loading / cache / Hub half: every bad input or fault gives one clear line, and
nothing outside the intended paths changes (the cache, the Hugging Face cache, the output).

Faults are injected with the loopback servers of ``tests/http_server.py``; the CLIs are run
through ``main([...])`` and their one stderr line and exit code are asserted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict

import pytest
import torch

import trex_hub
from http_server import Faults, FileServer
from trex_hub.checkpoint import CheckpointError
from trex_hub.cli import download as dl_cli
from trex_hub.hub import cache
from trex_hub.hub.hf import parse_hf_id
from trex_hub.hub.http import DownloadError
from trex_hub.model import TReX

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under ``root`` with its SHA-256 (to show that nothing changed)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def small_model(num_layers: int = 1) -> TReX:
    torch.manual_seed(0)
    return TReX("resnet18", projector={"num_layers": num_layers, "hidden_dim": 32,
                                       "out_dim": 8}, num_classes=5, name="mini").eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return trex_hub.save_pretrained(small_model(), tmp_path_factory.mktemp("exp") / "mini")


# --------------------------------------------------------------------------------------------
# hf-hub: ids and revisions are validated before any network or disk access
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["hf-hub:a/b@../../../../victim.txt", "hf-hub:a/b@/etc/passwd",
                                  "hf-hub:a/b@x/../../y", "hf-hub:a/b@.git", "hf-hub:a/b@x y",
                                  "hf-hub:../b", "hf-hub:a/../b", "hf-hub:/abs/b",
                                  "hf-hub:a--x/b", "hf-hub:a/b@x/"])
def test_bad_hub_ids_and_revisions_are_refused(spec):
    with pytest.raises(ValueError, match="not a (valid Hub revision|Hub model id)"):
        parse_hf_id(spec)


@pytest.mark.parametrize("spec", ["hf-hub:a/b@main", "hf-hub:a/b@refs/pr/1", "hf-hub:a/b@v1.0",
                                  "hf-hub:a/b@feature/x-y_z", "hf-hub:gpt2", "hf-hub:a.b/c_d-e",
                                  "hf-hub:a/b@" + "0" * 40])
def test_good_hub_ids_and_revisions_pass(spec):
    repo, rev = parse_hf_id(spec)
    assert "/" in repo or repo == "gpt2"


def test_revision_escaping_the_cache_writes_nothing(hub, export, tmp_path, capsys):
    """Issue 10 item 2: the endpoint answers the revision with a commit header; nothing is asked
    of it, nothing is written, and the victim file is unchanged."""
    files = {n: (export / n).read_bytes() for n in ("config.json", "model.safetensors")}
    sha = hub.add("a/b", files)
    bad = "../../../../victim.txt"
    hub.repos["a/b"].refs[bad] = sha  # an endpoint that would answer with X-Repo-Commit
    victim = tmp_path / "victim.txt"  # HF_HOME/hub/models--a--b/refs/../../../../victim.txt
    victim.write_text("precious\n")
    before = snapshot(tmp_path)
    code = dl_cli.main([f"hf-hub:a/b@{bad}"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("trex-download: error: revision ")
    assert "not a valid Hub revision" in line
    assert victim.read_text() == "precious\n"
    assert snapshot(tmp_path) == before and hub.log == []
    with pytest.raises(ValueError, match="not a valid Hub revision"):
        trex_hub.load("hf-hub:a/b", revision=bad)
    assert snapshot(tmp_path) == before and hub.log == []


# --------------------------------------------------------------------------------------------
# config.json is validated against a schema with bounds, naming the field and the file
# --------------------------------------------------------------------------------------------
def edited_export(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for dotted, value in changes.items():
        keys = dotted.split("__")
        target = cfg
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


BAD_CONFIGS = [
    ({"projector__num_layers": 10 ** 7}, "'projector.num_layers' must be an integer from 0 to 16"),
    ({"projector__hidden_dim": 10 ** 12}, "'projector.hidden_dim' must be an integer"),
    ({"projector": "yes"}, "'projector' must be an object or null, found str 'yes'"),
    ({"num_features": "many"}, "'num_features' must be 512 for resnet18, found 'many'"),
    ({"arch": "resnet9000"}, "'arch' must be one of resnet18, resnet34"),
    ({"arch": ["resnet50"]}, "'arch' must be one of"),
    ({"projector__out_dim": -1}, "'projector.out_dim' must be an integer from 1"),
    ({"projector__num_layers": 2.5}, "'projector.num_layers' must be an integer"),
    ({"projector__l2_norm": "no"}, "'projector.l2_norm' must be true or false"),
    ({"projector__hidden_dim": 16384, "projector__num_layers": 16},
     "describe heads with .* parameters, over the limit"),
    ({"classifier__num_classes": 10 ** 9}, "'classifier.num_classes' must be an integer"),
    ({"classifier__tau": 0}, "'classifier.tau' must be a positive number"),
    ({"classifier__type": "mlp"}, "'classifier.type' must be 'prototypes'"),
    ({"preprocess__resize": 10 ** 9}, "'preprocess.resize' must be an integer from 1 to 4096"),
    ({"preprocess__mean": "grey"}, "'preprocess.mean' must be a list of 3 numbers"),
    ({"name": 5}, "'name' must be a string or null"),
    ({"license": "mit\nlibrary_name: evil"}, "'license' must be a licence name"),  # into the card
    ({"license": ["mit"]}, "'license' must be a licence name"),
    ({"derived_from": {"a": 1}}, "'derived_from' must be a model name"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS,
                         ids=[next(iter(c)) + "=" + str(next(iter(c.values())))[:12]
                              for c, _ in BAD_CONFIGS])
def test_bad_config_names_the_field_and_the_file(export, tmp_path, changes, message):
    folder = edited_export(export, tmp_path / "bad", **changes)
    before = snapshot(tmp_path)
    for pretrained in (True, False):
        with pytest.raises(CheckpointError, match=message) as info:
            trex_hub.load(folder, projector=True, pretrained=pretrained)
        assert str(folder / "config.json") in str(info.value)
        assert "\n" not in str(info.value)
    assert snapshot(tmp_path) == before


def test_bad_config_from_the_hub_is_refused_before_building(hub, export, tmp_path):
    folder = edited_export(export, tmp_path / "bad", projector__num_layers=10 ** 7)
    hub.add("org/bad", {n: (folder / n).read_bytes() for n in ("config.json",
                                                               "model.safetensors")})
    for pretrained in (True, False):
        with pytest.raises(CheckpointError, match="'projector.num_layers' must be an integer "
                                                  "from 0 to 16, found 10000000"):
            trex_hub.load("hf-hub:org/bad", projector=True, pretrained=pretrained)


def test_bad_config_through_trex_extract_is_one_line(export, tmp_path, capsys):
    from PIL import Image

    from trex_hub.cli import extract as ex_cli

    folder = edited_export(export, tmp_path / "bad", projector__hidden_dim=10 ** 12)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(images / "a.png")
    out = tmp_path / "out" / "f.npy"
    code = ex_cli.main([str(folder), str(images), "-o", str(out), "--head", "projector",
                        "--quiet"])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("trex-extract: error: ")
    assert "'projector.hidden_dim' must be an integer from 1 to 16384" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_config_schema_accepts_every_export_and_the_released_configs(export):
    from trex_hub.configschema import validate_config
    from trex_hub.registry import MODELS

    validate_config(json.loads((export / "config.json").read_text()))
    for name in MODELS:
        validate_config(TReX.from_config(
            trex_hub.load(name, pretrained=False, projector=MODELS[name].has_projector)
            .config()).config())


# --------------------------------------------------------------------------------------------
# Messages: refused pickles, empty names, a folder without weights
# --------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_legacy_malicious_pickle_is_refused_not_called_truncated(tmp_path, protocol):
    import pickle

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:  # a plain (non-zip) pickle, as torch's legacy format is
        pickle.dump({"state": _Evil()}, fh, protocol=protocol)
    with pytest.raises(CheckpointError, match=r"refused to load: .*asks for posix\.system") as e:
        trex_hub.load(path)
    assert "truncated" not in str(e.value)


def test_legacy_truncated_or_garbage_files_are_not_called_malicious(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "ok.pth").read_bytes()
    for name, blob in (("half.pth", data[: len(data) // 2]), ("tiny.pth", data[:30]),
                       ("page.pth", b"<html>502 Bad Gateway</html>" * 8)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            trex_hub.load(tmp_path / name)


def test_a_missing_path_is_called_missing_not_an_unknown_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exported").mkdir()
    for arg in ("exported/my_trex", str(tmp_path / "trexstar.pth"), "trex_star.safetensors",
                tmp_path / "trex_star"):
        with pytest.raises(trex_hub.ModelLoadError) as info:
            trex_hub.load(arg)
        msg = str(info.value)
        assert "no such file or folder" in msg and "Did you mean" not in msg, msg
    with pytest.raises(trex_hub.ModelLoadError, match=f"{tmp_path / 'exported'} exists; "
                                                      "my_trex in it does not"):
        trex_hub.load("exported/my_trex")
    with pytest.raises(trex_hub.UnknownModelError, match="Did you mean 'trex_star'"):
        trex_hub.load("trex_sta")  # a name, not a path: the registry's suggestion


def test_a_local_file_that_is_no_checkpoint_is_not_told_to_download_it_again(tmp_path):
    """"Delete it and download it again" fits the download cache's files, not an image passed
    as the model by mistake."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.jpg")
    with pytest.raises(CheckpointError) as info:
        trex_hub.load(tmp_path / "img.jpg")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'img.jpg'}: not a readable PyTorch checkpoint")
    assert "download it again" not in msg and "Give a checkpoint: a .pth" in msg


def test_a_folder_named_like_a_model_is_named_in_a_warning(export, tmp_path, monkeypatch):
    """The registry name wins (it always did); the warning says how to load the folder."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(export, tmp_path / "trex_star")
    monkeypatch.setenv("TREX_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="'trex_star' is the registry model trex_star; the local "
                                         "'trex_star' is not used \\(load './trex_star' for it"):
        with pytest.raises(cache.OfflineError):
            trex_hub.load("trex_star")
    assert trex_hub.load("./trex_star").arch == "resnet18"


def test_empty_name_does_not_list_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(30):
        (tmp_path / f"private_{i}.txt").write_text("x")
    for empty in ("", "  "):
        with pytest.raises(trex_hub.ModelLoadError, match="an empty model name") as e:
            trex_hub.load(empty)
        assert "private_" not in str(e.value)


def test_folder_without_weights_lists_a_few_names_only(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"needs 'model.safetensors'.*and 25 more") as e:
        trex_hub.load(tmp_path)
    assert "f29" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Read-only caches, partials left by another source, cache messages
# --------------------------------------------------------------------------------------------
def read_only(monkeypatch, root: Path) -> None:
    """Make every write under ``root`` fail with EROFS, as on a read-only mount (chmod cannot
    stop root, and mounting needs privileges the tests may not have)."""
    import builtins
    import errno
    import io

    root = Path(root).resolve()

    def inside(path) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except TypeError:  # a file descriptor
            return False
        return p == root or root in p.parents

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    def guard(fn, writes=lambda *a, **k: True):
        def wrapped(path, *args, **kwargs):
            if inside(path) and writes(*args, **kwargs):
                refuse(path)
            return fn(path, *args, **kwargs)
        return wrapped

    real_open = builtins.open
    opened = guard(real_open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)
    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: bool(
        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))))
    for name in ("mkdir", "unlink", "remove", "rmdir", "replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def test_read_only_cache_holding_only_the_file_loads_it(released_files, tmp_path, monkeypatch,
                                                        caplog, capsys):
    """Issue 10 item 7: what the offline hint 'copy the file there' produces."""
    ro = tmp_path / "ro_cache"
    ro.mkdir()
    (ro / "trexstar.pth").write_bytes((released_files / "trexstar.pth").read_bytes())
    before = snapshot(ro)
    read_only(monkeypatch, ro)
    with pytest.raises(OSError):
        (ro / "probe").write_text("x")  # the emulation holds
    with caplog.at_level("WARNING", logger="trex_hub"):
        for _ in range(2):
            model = trex_hub.load("trex_star", cache_dir=ro, base_url="http://127.0.0.1:9/")
            assert model.arch == "resnet50"
        code = dl_cli.main(["trex_star", "--cache-dir", str(ro), "--offline"])
    assert code == 0 and capsys.readouterr().out.strip() == str(ro / "trexstar.pth")
    notes = [r.getMessage() for r in caplog.records]
    assert len([n for n in notes if "not writable" in n]) == 1, notes  # said once
    assert not any("file locks" in n for n in notes)
    assert snapshot(ro) == before


def test_empty_read_only_cache_is_one_clear_line(released_files, tmp_path, monkeypatch, caplog,
                                                 capsys):
    ro = tmp_path / "ro_cache"
    ro.mkdir()
    read_only(monkeypatch, ro)
    with FileServer(released_files) as srv, caplog.at_level("WARNING", logger="trex_hub"):
        code = dl_cli.main(["trex_star", "--cache-dir", str(ro), "--base-url", srv.url])
        with pytest.raises(cache.ReadOnlyCacheError):
            trex_hub.load("trex_star", cache_dir=ro, base_url=srv.url)
        assert srv.requests == []  # nothing downloaded that could not be kept
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("trex-download: error: the cache ")
    assert str(ro) in line and "TREX_HUB_CACHE" in line and "'trexstar.pth'" in line
    assert not any("file locks" in r.getMessage() for r in caplog.records)
    assert snapshot(ro) == {}


def test_partial_from_another_source_is_retried_once_from_byte_0(released_files, tmp_path,
                                                                  monkeypatch, caplog):
    """Issue 10 item 8: a stalled mirror serving other bytes leaves a 4 KB partial; the good
    mirror's resume onto it fails the check, and the same call downloads it again cleanly."""
    monkeypatch.setenv("TREX_HUB_RETRIES", "0")
    monkeypatch.setenv("TREX_HUB_BACKOFF", "0")
    good = (released_files / "trexstar.pth").read_bytes()
    other = (b"<html>maintenance</html>" * (len(good) // 24 + 1))[:len(good)]
    cache_dir = tmp_path / "cache"
    with FileServer(released_files, faults=Faults(replace={"trexstar.pth": other},
                                                 drop_after=4096)) as bad:
        with pytest.raises(DownloadError, match="4096 bytes are kept"):
            trex_hub.fetch("trex_star", cache_dir=cache_dir, base_url=bad.url, progress=False)
    partial = cache.partial_path(cache_dir / "trexstar.pth")
    assert partial.stat().st_size == 4096
    with FileServer(released_files) as srv, caplog.at_level("WARNING", logger="trex_hub"):
        path = trex_hub.fetch("trex_star", cache_dir=cache_dir, base_url=srv.url,
                              progress=False)
        ranges = [r for _, _, r, _ in srv.gets("trexstar.pth")]
    assert ranges == ["bytes=4096-", None]  # the resume, then once from byte 0
    assert path.read_bytes() == good and not partial.exists()
    assert cache.read_manifest(path)["sha256"] == hashlib.sha256(good).hexdigest()
    assert any("from byte 0" in r.getMessage() for r in caplog.records)


def test_a_rejected_download_does_not_also_say_download_it_again(released_files, tmp_path):
    page = b"<html>502 Bad Gateway</html>" * 40
    with FileServer(released_files, faults=Faults(replace={"trexstar.pth": page})) as srv:
        with pytest.raises(CheckpointError) as info:
            trex_hub.load("trex_star", base_url=srv.url, progress=False)
    msg = str(info.value)
    assert "rejected, not kept in the cache" in msg and "not a readable PyTorch checkpoint" in msg
    assert "Delete it" not in msg and "\n" not in msg
    assert snapshot(Path(os.environ["TREX_HUB_CACHE"])).keys() <= {".locks/trexstar_pth.lock"}


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 411041792 bytes."),
    MemoryError(), PermissionError(13, "Permission denied")])
def test_a_good_cached_file_that_cannot_be_read_is_kept(released_files, tmp_path, monkeypatch,
                                                        capsys, failure):
    """Out of memory (torch's allocator raises a RuntimeError), or a file this user may not
    read: the bytes were never judged, so the cache keeps the file and its manifest (offline,
    they could not be downloaded again) and the error says what to do."""
    cache_dir = tmp_path / "cache"
    with FileServer(released_files) as srv:
        trex_hub.fetch("trex_star", cache_dir=cache_dir, base_url=srv.url, progress=False)
    before = snapshot(cache_dir)
    monkeypatch.setenv("TREX_HUB_OFFLINE", "1")

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(trex_hub.CheckpointReadError) as info:
        trex_hub.load("trex_star", cache_dir=cache_dir)
    msg = str(info.value)
    assert str(cache_dir / "trexstar.pth") in msg and "left as it is" in msg
    assert ("memory" in msg) != isinstance(failure, PermissionError)
    assert "deleted" not in msg and snapshot(cache_dir) == before
    code = dl_cli.main(["trex_star", "--cache-dir", str(cache_dir)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("trex-download: error: ") and "unexpected" not in line
    assert snapshot(cache_dir) == before


# --------------------------------------------------------------------------------------------
# push_to_hub: one line naming the repository, not a raw Hub-client exception
# --------------------------------------------------------------------------------------------
def test_push_to_hub_errors_are_one_line(hub, monkeypatch):
    from trex_hub.hub.hf import UploadError

    model = small_model()
    with pytest.raises(UploadError, match=r"hf-hub:tester/absent: the repository does not exist"
                                          r".*token=.*create_repo=True") as info:
        trex_hub.push_to_hub(model, "tester/absent", create_repo=False)
    assert "\n" not in str(info.value)
    hub.add("tester/private", {"a.txt": b"1"}, private=True)
    with pytest.raises(UploadError, match="tester/private: the repository does not exist .*or "
                                          "this token cannot write it"):
        trex_hub.push_to_hub(model, "tester/private", create_repo=False, token="hf_wrong")
    with pytest.raises(ValueError, match="not a valid Hub revision"):
        trex_hub.push_to_hub(model, "tester/x", revision="../x")
    assert "tester/x" not in hub.repos


def test_push_to_hub_unreachable_endpoint_is_one_line():
    from trex_hub.hub.hf import UploadError

    with pytest.raises(UploadError, match=r"hf-hub:tester/x: could not reach the Hub at "
                                          r"http://127\.0\.0\.1:9 .*HF_ENDPOINT") as info:
        trex_hub.push_to_hub(small_model(), "tester/x", token="hf_x",
                             endpoint="http://127.0.0.1:9")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("var", ["TREX_HUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_push_to_hub_offline_uploads_nothing(hub, monkeypatch, var):
    """The README: with the offline switch trex_hub never touches the network."""
    monkeypatch.setenv(var, "1")
    with pytest.raises(cache.OfflineError, match="offline mode is on .*uploading to "
                                                 "'tester/leak' needs the network"):
        trex_hub.push_to_hub(small_model(), "tester/leak", token="hf_test_token")
    assert "tester/leak" not in hub.repos and hub.log == []


# --------------------------------------------------------------------------------------------
# trex-download: offline with an empty cache, a 404, a bad config: one line each
# --------------------------------------------------------------------------------------------
def test_trex_download_loading_faults_are_one_line(released_files, hub, export, tmp_path,
                                                   capsys):
    cache_dir = tmp_path / "cache"
    code = dl_cli.main(["trex_star", "--offline", "--cache-dir", str(cache_dir)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "offline mode is on and 'trexstar.pth' is not cached" in line
    # the flag set it, not the variables: the way out names the flag
    assert "run without --offline" in line and "unset TREX_HUB_OFFLINE" not in line
    with FileServer(tmp_path / "empty_mirror") as srv:
        code = dl_cli.main(["trex_star", "--cache-dir", str(cache_dir), "--base-url", srv.url])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "HTTP 404" in line and "TREX_HUB_BASE_URL" in line
    assert snapshot(cache_dir) == {} or set(snapshot(cache_dir)) <= {".locks/trexstar_pth.lock"}
    folder = edited_export(export, tmp_path / "bad", projector="yes")
    hub.add("org/bad", {n: (folder / n).read_bytes() for n in ("config.json",
                                                               "model.safetensors")})
    out = tmp_path / "exported"
    code = dl_cli.main(["hf-hub:org/bad", "--to-safetensors", str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and "'projector' must be an object or null, found str 'yes'" in line
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# trex-download --list: sizes of files not cached
# --------------------------------------------------------------------------------------------
def test_list_asks_the_server_for_sizes_and_offline_says_not_cached(released_files, tmp_path,
                                                                    capsys):
    cache_dir = tmp_path / "cache"
    with FileServer(released_files) as srv:
        code = dl_cli.main(["--list", "--json", "--base-url", srv.url])
        heads = [e for e in srv.log if e[0] == "HEAD"]
        assert srv.requests == []  # HEAD only: no body was fetched
    assert code == 0
    files = {f["filename"]: f for r in json.loads(capsys.readouterr().out) for f in r["files"]}
    for name, f in files.items():
        assert f["size"] == (released_files / name).stat().st_size, name
        assert f["size_source"] == "server" and not f["cached"]
    assert len(heads) == len(files)
    with FileServer(released_files) as srv:
        code = dl_cli.main(["--list", "--offline", "--base-url", srv.url])
        assert srv.log == []
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert code == 0 and "not cached + not cached" in rows["trex_star_repro"]
    assert "?" not in out
    # a server that does not answer: "?" quickly, no error
    code = dl_cli.main(["--list", "--base-url", "http://127.0.0.1:9/"])
    out = capsys.readouterr().out
    assert code == 0 and "?" in out
    assert snapshot(cache_dir) == {}


def test_source_hf_says_that_no_released_model_is_on_the_hub(monkeypatch):
    """README: no registry entry has a Hub mirror today, and source='hf' says so plainly."""
    from trex_hub.registry import MODELS

    assert all(e.hf_repo is None for e in MODELS.values())
    with pytest.raises(trex_hub.ModelLoadError, match="no Hugging Face Hub mirror.*no released "
                                                      "model has a Hub mirror yet"):
        trex_hub.load("trex_star", source="hf")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "no registry entry has a Hub mirror" in readme
