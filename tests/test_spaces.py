from pathlib import Path

import pytest

from search.space import load_space, parse_space, to_tune
from trainables.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_space_file_loads_and_starts_with_its_command(path):
    space = load_space(path)
    assert space.params and to_tune(space).keys() == space.params.keys()
    assert path.read_text().startswith("# python -m search.run")


@pytest.mark.parametrize("doc, message", [
    ({"params": {"lora.rank": {"type": "choice", "values": [4]}}}, r"params\.lora\.rank: not a trial setting"),
    ({"params": {"optim.learning_rate": {"type": "loguniform", "low": 1e-2, "high": 1e-3}}},
     r"params\.optim\.learning_rate: low <= high must hold"),
    ({"params": {"lora.r": {"type": "choice", "values": []}}}, r"params\.lora\.r: values must be a non-empty list"),
    ({"params": {"lora.dropout": {"type": "uniform", "low": "a", "high": 0.1}}}, r"params\.lora\.dropout: low must be a number"),
    ({"params": {"lora.r": {"type": "choice", "values": [0, 8]}}}, r"params\.lora\.r: lora\.r: .*greater than 0"),
    ({"params": {"lora.r": {"type": "normal", "mu": 1}}}, r"params\.lora\.r: type 'normal' is not one of"),
    ({"params": {"lora.r": {"type": "choice", "values": [8]}}, "extra": 1}, r"unknown top-level key 'extra'"),
    ({"params": {"lora.r": {"type": "choice", "values": [8]}}, "points_to_evaluate": [{"lora.r": 16}]},
     r"points_to_evaluate\[0\]\.lora\.r=16 is outside its range"),
])
def test_bad_spaces_name_the_file_and_key(doc, message):
    with pytest.raises(SettingsError, match=r"^myspace\.yaml: " + message):
        parse_space(doc, "myspace.yaml")
