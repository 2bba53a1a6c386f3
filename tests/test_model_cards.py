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
