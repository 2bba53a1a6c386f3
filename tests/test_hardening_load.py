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
from http_server import Faults, FileServer, HubServer
from trex_hub.checkpoint import CheckpointError
from trex_hub.cli import download as dl_cli
from trex_hub.hub import cache
from trex_hub.hub.hf import parse_hf_id
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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url.rstrip("/"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        yield srv


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
