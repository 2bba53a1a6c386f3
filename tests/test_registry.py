import json

import pytest

import trex_hub
from trex_hub import registry


def test_list_models_is_the_four_released_models():
    assert trex_hub.list_models() == ["trex", "trex_repro", "trex_star", "trex_star_repro"]


@pytest.mark.parametrize("alias,name", [
    ("t-rex*", "trex_star"), ("T-ReX*", "trex_star"), ("trexstar", "trex_star"),
    ("TREXSTAR", "trex_star"), ("trex_2", "trex_repro"), ("trexstar_2", "trex_star_repro"),
    (" Trex ", "trex"), ("trex_star_repro", "trex_star_repro"),
])
def test_aliases_are_case_insensitive(alias, name):
    assert registry.get_entry(alias).name == name
    assert trex_hub.model_info(alias)["name"] == name


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(trex_hub.UnknownModelError) as err:
        trex_hub.model_info("trex_strr")
    msg = str(err.value)
    assert "Did you mean 'trex_star'" in msg
    for name in trex_hub.list_models():
        assert name in msg


def test_entries_follow_the_spec():
    info = {n: trex_hub.model_info(n) for n in trex_hub.list_models()}
    assert info["trex"]["projector"]["num_layers"] == 3
    assert info["trex_repro"]["projector"]["num_layers"] == 3
    assert info["trex_star"]["projector"]["num_layers"] == 1
    assert info["trex_star_repro"]["projector"]["num_layers"] == 1
    files = {n: [f["filename"] for f in i["files"]] for n, i in info.items()}
    assert files == {
        "trex": ["trex.pth"],
        "trex_repro": ["trex_2.pth", "trex_2_checkpoint_full.pth"],
        "trex_star": ["trexstar.pth"],
        "trex_star_repro": ["trexstar_2.pth", "trexstar_2_checkpoint_full.pth"],
    }
    metrics = {n: (i["metrics"]["imagenet_top1"], i["metrics"]["transfer_log_odds"])
               for n, i in info.items()}
    assert metrics == {"trex": (78.0, 1.1704), "trex_star": (80.2, 0.8829),
                       "trex_repro": (77.9, 1.1664), "trex_star_repro": (80.2, 0.8800)}
    for i in info.values():
        assert i["license"] == "cc-by-nc-sa-4.0"
        assert "2206.15369" in i["citation"]
        assert i["projector"]["hidden_dim"] == 2048 and i["projector"]["out_dim"] == 256
        json.dumps(i)  # plain data
    assert [n for n, i in info.items() if i["has_projector"]] == ["trex_repro", "trex_star_repro"]
