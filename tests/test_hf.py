"""Hugging Face Hub: the real huggingface_hub client against a Hub emulator on 127.0.0.1."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import trex_hub
from http_server import FileServer, HubServer
from trex_hub import cards, registry
from trex_hub.api import ModelLoadError
from trex_hub.hub import download as dl
from trex_hub.model import TReX

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
FILES = ("config.json", "model.safetensors", "README.md")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(seed: int = 0, name: str = "mini") -> TReX:
    """A resnet18 t-ReX with projector and prototypes: every kind of tensor, small enough."""
    torch.manual_seed(seed)
    model = TReX("resnet18", projector={"num_layers": 2, "hidden_dim": 64, "out_dim": 16},
                 num_classes=10, name=name)
    with torch.no_grad():
        protos = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
        model.classifier.prototypes.copy_(protos)
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs(model: TReX):
    with torch.no_grad():
        return model(X), model.forward_logits(X), model.forward_features(X)


def assert_same(a: TReX, b: TReX) -> None:
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)  # bit-identical
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model()
    folder = trex_hub.save_pretrained(model, tmp_path_factory.mktemp("export") / "mini")
    return model, folder


def publish(hub: HubServer, repo: str, folder: Path, **kw) -> str:
    return hub.add(repo, {n: (folder / n).read_bytes() for n in FILES}, **kw)


# --------------------------------------------------------------------------------------------
# save_pretrained
# --------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_is_bit_identical(exported):
    model, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    loaded = trex_hub.load(folder, projector=True)
    assert_same(model, loaded)
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["projector"]["num_layers"] == 2
    assert config["classifier"]["num_classes"] == 10 and config["format"] == "trex_hub"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:  # tensors only
        assert set(fh.keys()) == set(model.state_dict())
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "trex_hub"
    assert 'trex_hub.load("path/to/this/folder", projector=True)' in card.text


@pytest.mark.parametrize("name", registry.list_models())
def test_cards_of_released_models_carry_the_registry_facts(name):
    entry = registry.get_entry(name)
    cfg = {"arch": "resnet50", "num_features": 2048, "projector": None, "classifier": None,
           "release": name}
    card = cards.render_card(cfg, name=name, repo_id=f"org/{name}")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-nc-sa-4.0" and data["library_name"] == "trex_hub"
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results["imagenet-1k"] == pytest.approx(entry.imagenet_top1)
    assert results["trex-transfer-15"] == pytest.approx(entry.transfer_log_odds)
    assert "CC BY-NC-SA 4.0" in card.text and f'trex_hub.load("hf-hub:org/{name}")' in card.text


def test_card_from_registry_facts_when_no_card_file(monkeypatch, tmp_path):
    monkeypatch.setattr(cards, "_CARDS_DIR", tmp_path / "none")
    cfg = {"arch": "resnet50", "num_features": 2048, "projector": None, "classifier": None,
           "release": "trex_star"}
    card = cards.render_card(cfg, name="t-ReX*")
    assert card.data.license == "cc-by-nc-sa-4.0" and "2206.15369" in card.text
    assert {r.metric_value for r in card.data.eval_results} == {80.2, 0.8829}


# --------------------------------------------------------------------------------------------
# hf-hub: loading
# --------------------------------------------------------------------------------------------
def test_load_hf_hub_id_through_the_real_client(hub, exported, tmp_path):
    model, folder = exported
    sha = publish(hub, "org/mini", folder)
    loaded = trex_hub.load("hf-hub:org/mini", projector=True)
    assert_same(model, loaded)
    snap = tmp_path / "hf_home" / "hub" / "models--org--mini" / "snapshots" / sha
    assert (snap / "model.safetensors").is_file() and (snap / "config.json").is_file()
    n = len(hub.downloads)
    assert n == 2
    backbone_only = trex_hub.load("hf-hub:org/mini")  # from the HF cache, no new GET
    assert len(hub.downloads) == n and not backbone_only.has_projector
    with torch.no_grad():
        assert torch.equal(backbone_only(X), model.forward_features(X))


def test_revisions_branches_tags_and_commits(hub, exported, tmp_path):
    model, folder = exported
    v1 = publish(hub, "org/mini", folder, tag="v1")
    newer = trex_hub.save_pretrained(small_model(seed=1), tmp_path / "v2")
    v2 = publish(hub, "org/mini", newer)
    assert v1 != v2
    assert_same(model, trex_hub.load("hf-hub:org/mini@v1", projector=True))
    assert_same(model, trex_hub.load(f"hf-hub:org/mini@{v1}", projector=True))
    assert_same(model, trex_hub.load("hf-hub:org/mini", revision="v1", projector=True))
    latest = trex_hub.load("hf-hub:org/mini", projector=True)
    assert not torch.equal(outputs(latest)[0], outputs(model)[0])
    with pytest.raises(ValueError, match="use one"):
        trex_hub.load("hf-hub:org/mini@v1", revision="main")
    with pytest.raises(dl.NotFoundError, match="revision 'nope' does not exist"):
        trex_hub.load("hf-hub:org/mini@nope")


def test_hf_offline_with_and_without_a_warm_cache(hub, exported, monkeypatch):
    model, folder = exported
    publish(hub, "org/mini", folder)
    for var in ("HF_HUB_OFFLINE", "TREX_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(dl.OfflineError) as err:
            trex_hub.load("hf-hub:org/mini")
        assert "trex-download hf-hub:org/mini" in str(err.value)
        monkeypatch.delenv(var)
    assert hub.log == []
    trex_hub.load("hf-hub:org/mini")
    n = len(hub.log)
    for var in ("HF_HUB_OFFLINE", "TREX_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert_same(trex_hub.load("hf-hub:org/mini", projector=True),
                    trex_hub.load(folder, projector=True))
        monkeypatch.delenv(var)
    assert len(hub.log) == n  # not one request


def test_private_repos_need_the_token(hub, exported):
    _, folder = exported
    publish(hub, "org/secret", folder, private=True)
    with pytest.raises(dl.NotFoundError, match="pass token="):
        trex_hub.load("hf-hub:org/secret")
    assert trex_hub.load("hf-hub:org/secret", token=hub.token).arch == "resnet18"
    assert f"Bearer {hub.token}" in hub.auth


def test_clear_errors_for_missing_repos_and_non_trex_repos(hub):
    with pytest.raises(dl.NotFoundError, match="repository not found"):
        trex_hub.load("hf-hub:org/absent")
    hub.add("org/other", {"pytorch_model.bin": b"123"})
    with pytest.raises(dl.NotFoundError, match="not a trex_hub model.*push_to_hub"):
        trex_hub.load("hf-hub:org/other")
    with pytest.raises(ValueError, match="not a Hub model id"):
        trex_hub.load("hf-hub:a/b/c")


# --------------------------------------------------------------------------------------------
# push_to_hub
# --------------------------------------------------------------------------------------------
def test_push_to_hub_then_load(hub, exported):
    model, _ = exported
    url = trex_hub.push_to_hub(model, "tester/pushed", token=hub.token)
    assert url.startswith(hub.url + "tester/pushed/commit/")
    repo = hub.repos["tester/pushed"]
    tree = repo.commits[repo.refs["main"]]
    assert set(FILES) <= set(tree)
    assert "library_name: trex_hub" in tree["README.md"].decode()
    assert f"Bearer {hub.token}" in hub.auth
    assert_same(model, trex_hub.load("hf-hub:tester/pushed", projector=True))
    # a second push is a new commit on the same repo
    trex_hub.push_to_hub(small_model(seed=3), "tester/pushed", token=hub.token,
                         commit_message="v2")
    assert len(repo.commits) == 3  # initial + 2 pushes


# --------------------------------------------------------------------------------------------
# source="hf" for registry entries with an HF mirror
# --------------------------------------------------------------------------------------------
def test_registry_hf_mirror_is_used_only_when_asked(hub, released_files, monkeypatch, tmp_path):
    ref = trex_hub.load(released_files / "trexstar.pth")
    folder = trex_hub.save_pretrained(ref, tmp_path / "trex_star_export", name="trex_star")
    publish(hub, "naver/trex_star", folder)
    entry = registry.MODELS["trex_star"]
    monkeypatch.setitem(registry.MODELS, "trex_star",
                        dataclasses.replace(entry, hf_repo="naver/trex_star"))
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        via_hf = trex_hub.load("trex_star", source="hf")
        assert srv.requests == [] and len(hub.downloads) == 2
        default = trex_hub.load("trex_star", progress=False)
        assert len(srv.gets("trexstar.pth")) == 1 and len(hub.downloads) == 2
    with torch.no_grad():
        assert torch.equal(via_hf(X[:1]), default(X[:1]))
    repro = registry.MODELS["trex_star_repro"]
    monkeypatch.setitem(registry.MODELS, "trex_star_repro",
                        dataclasses.replace(repro, hf_repo="naver/trex_star_repro"))
    with pytest.raises(ModelLoadError, match="ema=True needs source='url'"):
        trex_hub.load("trex_star_repro", source="hf", ema=True)
    with pytest.raises(ModelLoadError, match="'trex' has no Hugging Face Hub mirror.*trex_star"):
        trex_hub.load("trex", source="hf")
    with pytest.raises(ModelLoadError, match="source='ftp' is not one of"):
        trex_hub.load("trex", source="ftp")


# --------------------------------------------------------------------------------------------
# pretrained=False and preprocessing through config.json
# --------------------------------------------------------------------------------------------
def test_pretrained_false_on_a_hub_id_downloads_only_config_json(hub, exported):
    model, folder = exported
    publish(hub, "org/mini", folder)
    arch = trex_hub.load("hf-hub:org/mini", pretrained=False, projector=True)
    assert [d[2] for d in hub.downloads] == ["config.json"]  # no weights
    assert arch.arch == "resnet18" and arch.head.num_layers == 2 and arch.classifier is None
    assert not torch.equal(arch.backbone.conv1.weight, model.backbone.conv1.weight)
    assert not trex_hub.load("hf-hub:org/mini", pretrained=False).has_projector
    torch.manual_seed(0)
    bare = TReX("resnet18", name="bare")
    publish(hub, "org/bare", trex_hub.save_pretrained(bare, folder.parent / "bare"))
    with pytest.raises(ModelLoadError, match="no projector"):  # same rule as with weights
        trex_hub.load("hf-hub:org/bare", pretrained=False, projector=True)


def test_preprocessing_travels_in_config_json(hub, tmp_path):
    model = small_model()
    model.set_preprocess(trex_hub.PreprocessConfig(resize=40, crop=32, interpolation="bilinear",
                                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    folder = trex_hub.save_pretrained(model, tmp_path / "pre")
    config = json.loads((folder / "config.json").read_text())
    assert config["preprocess"] == {"resize": 40, "crop": 32, "interpolation": "bilinear",
                                    "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert "resize 40 (bilinear), centre crop 32" in (folder / "README.md").read_text()
    publish(hub, "org/pre", folder)
    for loaded in (trex_hub.load(folder), trex_hub.load("hf-hub:org/pre"),
                   trex_hub.load("hf-hub:org/pre", pretrained=False)):
        assert loaded.preprocess_config == model.preprocess_config
        assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)


def test_one_renderer_for_trained_exports_even_under_a_released_name():
    cfg = {"arch": "resnet18", "num_features": 512, "projector": None, "classifier": None,
           "training": {"preset": "trex", "epochs_done": 2}, "source_checkpoint": "ck.pth"}
    for name in ("fm", "trex"):
        card = cards.render_card(cfg, name=name)
        assert card.data.license is None and card.data.library_name == "trex_hub"
        text = card.text
        assert text.lstrip().startswith(f"# {name}\n") and "**not** one of the released" in text
        assert "## Files of this export" in text and "- epochs_done: 2" in text
        assert text.index("## Files of this export") < text.index("## Training")


# --------------------------------------------------------------------------------------------
# Review F: the licence travels (#2), push to a branch (#5), features_only (#6), cards (#10a)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def trex_star(released_files, monkeypatch):
    """``trex_hub.load("trex_star")``, its (generated) released file served by a FileServer."""
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        yield trex_hub.load("trex_star", progress=False)


LICENSE = "cc-by-nc-sa-4.0"


def test_the_licence_survives_a_trip_through_the_hub(hub, trex_star, tmp_path):
    """Review F #2: a re-export of a Hub-loaded release keeps its licence, in every format."""
    assert trex_star.pretrained_cfg["license"] == LICENSE
    trex_hub.push_to_hub(trex_star, "tester/trex_star", token=hub.token)
    pushed = hub.repos["tester/trex_star"]
    assert json.loads(pushed.commits[pushed.refs["main"]]["config.json"])["license"] == LICENSE
    again = trex_hub.load("hf-hub:tester/trex_star")
    assert again.pretrained_cfg["name"] == "hf-hub:tester/trex_star"  # where it came from
    assert again.pretrained_cfg["license"] == LICENSE
    st = trex_hub.save_pretrained(again, tmp_path / "re_st")
    assert json.loads((st / "config.json").read_text())["license"] == LICENSE
    assert ModelCard.load(st / "README.md").data.license == LICENSE
    tm = trex_hub.save_pretrained(again, tmp_path / "re_timm", format="timm")
    assert json.loads((tm / "config.json").read_text())["pretrained_cfg"]["license"] == LICENSE
    assert ModelCard.load(tm / "README.md").data.license == LICENSE
    # and back from both folders (config.json's licence, a timm pretrained_cfg's licence)
    for folder in (st, tm):
        assert trex_hub.load(folder).pretrained_cfg["license"] == LICENSE
    assert trex_hub.load(folder, features_only=True).pretrained_cfg["license"] == LICENSE


def test_an_explicit_licence_is_recorded_and_a_bad_one_refused(tmp_path):
    folder = trex_hub.save_pretrained(small_model(), tmp_path / "mit", license="mit")
    assert json.loads((folder / "config.json").read_text())["license"] == "mit"
    assert trex_hub.load(folder).pretrained_cfg["license"] == "mit"
    assert "license" not in json.loads(
        (trex_hub.save_pretrained(small_model(), tmp_path / "none") / "config.json").read_text())


def test_push_to_a_branch_leaves_main_alone(hub, exported):
    """Review F #5: 'org/repo@dev' pushes to the branch dev (created from main)."""
    model, _ = exported
    url = trex_hub.push_to_hub(model, "tester/rev@dev", token=hub.token)
    repo = hub.repos["tester/rev"]
    assert url.endswith(repo.refs["dev"]) and "config.json" not in repo.commits[repo.refs["main"]]
    assert_same(model, trex_hub.load("hf-hub:tester/rev@dev", projector=True))
    with pytest.raises(dl.NotFoundError, match="no config.json"):
        trex_hub.load("hf-hub:tester/rev")  # main: still the empty repository
    newer = small_model(seed=4)
    trex_hub.push_to_hub(newer, "hf-hub:tester/rev", revision="dev", token=hub.token)
    assert_same(newer, trex_hub.load("hf-hub:tester/rev@dev", projector=True))
    assert len(repo.commits) == 3 and "config.json" not in repo.commits[repo.refs["main"]]
    with pytest.raises(ValueError, match="use one"):
        trex_hub.push_to_hub(model, "tester/rev@dev", revision="main")
    with pytest.raises(ValueError, match="not onto a commit id; name a branch"):
        trex_hub.push_to_hub(model, f"tester/rev@{repo.refs['dev']}")
    assert len(repo.commits) == 3


def test_save_pretrained_of_a_features_only_model_says_what_to_save(exported, tmp_path, hub):
    """Review F #6: one line, not an AttributeError, and nothing written."""
    _, folder = exported
    fm = trex_hub.load(folder, features_only=True)
    for kw in ({}, {"format": "timm"}):
        with pytest.raises(ValueError, match="features_only=True .* save the model loaded "
                                             "without features_only=True") as info:
            trex_hub.save_pretrained(fm, tmp_path / "fm", **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="features_only"):
        trex_hub.push_to_hub(fm, "tester/fm", token=hub.token)
    assert not (tmp_path / "fm").exists() and "tester/fm" not in hub.repos
    with pytest.raises(TypeError, match="takes a t-ReX model"):
        trex_hub.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "lin")


def test_a_release_card_only_for_the_release_architecture(tmp_path):
    """Review F #10a: a resnet18 saved under the name trex_star does not get its card."""
    torch.manual_seed(0)
    for fmt in ("trex_hub", "timm"):
        folder = trex_hub.save_pretrained(TReX("resnet18"), tmp_path / fmt, name="trex_star",
                                          format=fmt)
        text = (folder / "README.md").read_text()
        assert "ResNet-50" not in text and "80.2" not in text and "0.8829" not in text
        assert "Intended use" not in text
        assert "not that release's resnet50" in text


def test_a_changed_release_gets_a_derived_card_with_the_licence(trex_star, tmp_path):
    """Review F #10a: fine-tuned weights keep the release's name but not its card."""
    as_released = trex_hub.save_pretrained(trex_star, tmp_path / "as_released")
    assert "## Intended use" in (as_released / "README.md").read_text()
    assert "derived_from" not in json.loads((as_released / "config.json").read_text())
    with torch.no_grad():
        trex_star.backbone.layer4[0].conv1.weight.mul_(1.01)  # "fine-tuned"
    for fmt in ("trex_hub", "timm"):
        folder = trex_hub.save_pretrained(trex_star, tmp_path / f"tuned_{fmt}", format=fmt)
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == LICENSE and "Derived from the released t-ReX model " \
            "`trex_star`" in card.text
        assert "Intended use" not in card.text and "80.2" not in card.text
    folder = tmp_path / "tuned_trex_hub"
    config = json.loads((folder / "config.json").read_text())
    assert config["derived_from"] == "trex_star" and config["name"] == "trex_star"
    # loaded back and saved again: still derived, still licensed
    again = trex_hub.save_pretrained(trex_hub.load(folder), tmp_path / "again")
    assert "Derived from the released" in (again / "README.md").read_text()
    assert json.loads((again / "config.json").read_text())["license"] == LICENSE


def test_offline_touches_no_server_even_in_a_fresh_process(hub, tmp_path):
    """local_files_only alone let huggingface_hub fetch /api/agent-harnesses for its headers,
    once per process (a test process has it cached, hence a fresh interpreter): an offline
    load and `trex-download --verify hf-hub:...` (offline by design) must send nothing."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import sys, trex_hub\n"
            "try:\n    trex_hub.load('hf-hub:org/none')\n"
            "except trex_hub.hub.cache.OfflineError:\n    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code], env=dict(env, TREX_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    run = subprocess.run([sys.executable, "-m", "trex_hub.cli.download", "--verify",
                          "hf-hub:org/none"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "not cached" in run.stdout + run.stderr
    assert hub.log == []


# --------------------------------------------------------------------------------------------
# Review I #1: a licence given as text; #2: the release card only for the release's weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["trex_hub", "timm"])
@pytest.mark.parametrize("text", ["CC BY-NC-SA 4.0", "MIT OR Apache-2.0", "other: see # LICENSE"])
def test_a_licence_given_as_text_loads_back(tmp_path, fmt, text):
    """What save_pretrained writes, load reads back; the card's YAML keeps it one quoted value
    and tells the Hub ``license: other`` (it checks ``license`` against its list of ids)."""
    torch.manual_seed(0)
    folder = trex_hub.save_pretrained(TReX("resnet18"), tmp_path / "m", license=text,
                                      format=fmt)
    loaded = trex_hub.load(folder)
    assert loaded.pretrained_cfg["license"] == text
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "other" and card.data.license_name
    assert set(card.data.license_name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.")
    assert f"Licence of the weights: {text}." in card.text
    again = trex_hub.save_pretrained(loaded, tmp_path / "again")  # and on, unchanged
    assert json.loads((again / "config.json").read_text())["license"] == text


def test_a_timm_folder_of_the_previous_version_with_a_text_licence_loads(tmp_path):
    """Written as the base version (and timm) wrote it: loads, and the error for a licence
    that cannot be used names timm's field and no fix that writes it again."""
    torch.manual_seed(0)
    folder = trex_hub.save_pretrained(TReX("resnet18"), tmp_path / "t", format="timm")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["license"] = "CC BY-NC-SA 4.0"
    config["trex_hub"] = {"name": None, "arch": "resnet18", "format": "timm"}
    (folder / "config.json").write_text(json.dumps(config))
    assert trex_hub.load(folder).pretrained_cfg["license"] == "CC BY-NC-SA 4.0"
    config["pretrained_cfg"]["license"] = "mit\nlibrary_name: evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(trex_hub.CheckpointError, match="config field 'pretrained_cfg.license' "
                                                       "must be a licence name") as info:
        trex_hub.load(folder)
    assert "save_pretrained" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["mit\nlibrary_name: evil", "x" * 101, "`mit`", " ", 5])
def test_a_licence_that_would_not_load_back_is_refused_before_anything_is_written(
        tmp_path, hub, bad):
    model = small_model()
    for fmt in ("trex_hub", "timm"):
        with pytest.raises(ValueError, match=r"^license=.* must be a licence name on one line"):
            trex_hub.save_pretrained(model, tmp_path / fmt, license=bad, format=fmt)
        assert not (tmp_path / fmt).exists()
    n = len(hub.log)
    with pytest.raises(ValueError, match="license="):
        trex_hub.push_to_hub(model, "tester/bad", token=hub.token, license=bad)
    assert len(hub.log) == n and "tester/bad" not in hub.repos
    model.pretrained_cfg["license"] = bad  # set by hand: named as such
    with pytest.raises(ValueError, match=r"model\.pretrained_cfg\['license'\]="):
        trex_hub.save_pretrained(model, tmp_path / "cfg")
    assert not (tmp_path / "cfg").exists()


def test_a_release_saved_reloaded_and_changed_is_derived(trex_star, tmp_path):
    """Review I #2: the release digest travels in config.json, so a fine-tuned copy of a folder
    (not of the registry name) is still known to derive from the release."""
    first = trex_hub.save_pretrained(trex_star, tmp_path / "first")
    config = json.loads((first / "config.json").read_text())
    assert config["release"] == "trex_star" and len(config["release_digest"]) == 64
    reloaded = trex_hub.load(first)
    assert reloaded.pretrained_cfg["release"] == "trex_star"
    untouched = trex_hub.save_pretrained(reloaded, tmp_path / "untouched")
    assert "## Intended use" in (untouched / "README.md").read_text()  # still the release's
    timm_copy = trex_hub.load(trex_hub.save_pretrained(reloaded, tmp_path / "tm", format="timm"))
    assert timm_copy.pretrained_cfg["release"] == "trex_star"  # timm folders too
    with torch.no_grad():
        reloaded.backbone.conv1.weight.mul_(1.01)
    for fmt in ("trex_hub", "timm"):
        tuned = trex_hub.save_pretrained(reloaded, tmp_path / f"tuned_{fmt}", format=fmt)
        text = (tuned / "README.md").read_text()
        assert "Intended use" not in text and "80.2" not in text
        assert "Derived from the released t-ReX model `trex_star`" in text
    config = json.loads((tmp_path / "tuned_trex_hub" / "config.json").read_text())
    assert config["derived_from"] == "trex_star" and "release" not in config
    assert config["license"] == LICENSE


def test_a_folder_whose_weights_differ_from_its_recorded_release_is_derived(trex_star,
                                                                           tmp_path):
    from safetensors.torch import load_file, save_file

    folder = trex_hub.save_pretrained(trex_star, tmp_path / "edited")
    state = load_file(str(folder / "model.safetensors"))
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"] * 1.01
    save_file(state, str(folder / "model.safetensors"))
    loaded = trex_hub.load(folder)
    assert loaded.pretrained_cfg["derived_from"] == "trex_star"
    assert "release" not in loaded.pretrained_cfg
    again = trex_hub.save_pretrained(loaded, tmp_path / "again")
    assert "Intended use" not in (again / "README.md").read_text()


def test_a_release_with_its_projector_reloaded_without_it_is_still_the_release(
        released_files, monkeypatch, tmp_path):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        full = trex_hub.load("trex_star_repro", projector=True, progress=False)
    folder = trex_hub.save_pretrained(full, tmp_path / "full")
    backbone = trex_hub.load(folder)  # projector=False: the heads are left out
    assert not backbone.has_projector and backbone.pretrained_cfg["release"] == "trex_star_repro"
    again = trex_hub.save_pretrained(backbone, tmp_path / "backbone")
    assert "## Intended use" in (again / "README.md").read_text()
    assert "derived_from" not in json.loads((again / "config.json").read_text())


@pytest.mark.parametrize("fmt", ["trex_hub", "timm"])
def test_random_weights_named_after_a_release_do_not_get_its_card(tmp_path, fmt):
    torch.manual_seed(0)
    folder = trex_hub.save_pretrained(TReX("resnet50"), tmp_path / "r", name="trex_star",
                                      format=fmt)
    text = (folder / "README.md").read_text()
    assert "80.2" not in text and "0.8829" not in text and "Intended use" not in text
    assert "Exported under the name of the released model `trex_star`" in text
    if fmt == "trex_hub":
        assert "release" not in json.loads((folder / "config.json").read_text())


def test_trex_download_conversions_of_a_release_keep_its_card(released_files, monkeypatch,
                                                              tmp_path, capsys):
    """They are the release's weights: build_model knows the cache's vouched-for file."""
    from trex_hub.cli.download import main

    with FileServer(released_files) as srv:
        assert main(["trex_star", "-q", "--base-url", srv.url, "--to-safetensors",
                     str(tmp_path / "st"), "--to-timm", str(tmp_path / "tm")]) == 0
    for fmt in ("st", "tm"):
        folder = tmp_path / fmt / "trex_star"
        text = (folder / "README.md").read_text()
        assert "80.2" in text and "Exported under the name" not in text
        assert trex_hub.load(folder).pretrained_cfg["release"] == "trex_star"
    assert "## Intended use" in (tmp_path / "st" / "trex_star" / "README.md").read_text()
