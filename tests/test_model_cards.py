"""Every registry entry has a model card whose metadata and metrics match the registry."""
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import trex_hub

CARDS = Path(__file__).resolve().parent.parent / "model_cards"


def test_one_card_per_model_and_nothing_else():
    assert sorted(p.stem for p in CARDS.glob("*.md")) == trex_hub.list_models()


@pytest.mark.parametrize("name", trex_hub.list_models())
def test_card_matches_registry(name):
    info = trex_hub.model_info(name)
    card = ModelCard.load(CARDS / f"{name}.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-nc-sa-4.0" == info["license"]
    assert data["library_name"] == "trex_hub"
    assert "imagenet-1k" in data["datasets"]
    assert data["metrics"]
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results["imagenet-1k"] == pytest.approx(info["metrics"]["imagenet_top1"])
    assert results["trex-transfer-15"] == pytest.approx(info["metrics"]["transfer_log_odds"])
    text = card.text
    assert "CC BY-NC-SA 4.0" in text and "2206.15369" in text
    assert f'trex_hub.load("{name}"' in text
    for f in info["files"]:
        assert f["filename"] in text
    assert f"{info['projector']['num_layers']}-layer" in text
    assert ('projector=True' in text) == info["has_projector"]


# --------------------------------------------------------------------------------------------
# Review F #10b: an installed wheel carries the cards where trex_hub.cards reads them
# --------------------------------------------------------------------------------------------
ROOT = CARDS.parent


def _setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_setup_cfg_installs_the_cards_as_trex_hub_model_cards():
    cfg = _setup_cfg()
    packages = cfg["options"]["packages"].split()
    package_dir = dict(line.replace(" ", "").split("=") for line in
                       cfg["options"]["package_dir"].strip().splitlines())
    assert package_dir == {"trex_hub.model_cards": "model_cards"}
    assert cfg["options.package_data"]["trex_hub.model_cards"].strip() == "*.md"
    # the list is explicit (find: cannot map a folder outside trex_hub/): every subpackage is in
    subpackages = {".".join(p.parent.relative_to(ROOT).parts)
                   for p in (ROOT / "trex_hub").rglob("__init__.py")}
    assert set(packages) == subpackages | {"trex_hub.model_cards"}


def test_cards_are_read_from_the_package_when_installed(tmp_path, monkeypatch):
    from trex_hub import cards

    assert cards._CARDS_DIR == CARDS  # a checkout: the top-level folder
    fake = tmp_path / "site" / "trex_hub"
    (fake / "model_cards").mkdir(parents=True)
    monkeypatch.setattr(cards, "__file__", str(fake / "cards.py"))
    assert cards._cards_dir() == fake / "model_cards"  # a wheel: inside the package


@pytest.mark.slow
def test_a_built_wheel_holds_the_cards(tmp_path):
    """Builds a real wheel from a copy of the sources (setuptools in this environment)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    for name in ("trex_hub", "model_cards"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "whl"), str(src)], check=True)
    wheel, = (tmp_path / "whl").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("trex_hub/model_cards/")) == [
        f"trex_hub/model_cards/{m}.md" for m in trex_hub.list_models()]
