"""CLI conventions on every entry point: `--help` explains every option; `--set KEY=VALUE` reaches every config
field; bad input is one line."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from search.config import ExperimentConfig, dump_config, load_config
from trainables.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ["search.run", "search.export", "search.report", "trainables.tiny"]


class _Parsed(Exception):
    pass


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The argparse parser an entry point's main() builds (caught at its parse_args call, nothing runs)."""
    seen = {}

    def grab(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main([])
    monkeypatch.undo()
    return seen["parser"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_explains_every_option(module, monkeypatch):
    parser = parser_of(module, monkeypatch)
    assert parser.prog == f"python -m {module}" and len(parser.description or "") > 30
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) >= 15, (module, name)


def test_help_runs_for_every_entry_point():
    for module in ENTRY_POINTS:
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: python -m {module}"), (module, out.stderr)


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_set_reaches_every_config_field():
    """Every leaf of the schema, set on the command line to its own default (written as YAML), loads unchanged."""
    default = ExperimentConfig().model_dump(mode="json")
    fields = leaf_fields(ExperimentConfig)
    assert {"num_trials", "trial.optim.learning_rate", "trial.lora.r", "mlflow.tracking_uri",
            "resources.custom_per_worker", "objective.metric"} <= set(fields)
    for path in fields:
        value = default
        for part in path.split("."):
            value = value[part]
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        cfg = load_config(None, [f"{path}={text}"])
        assert cfg.model_dump(mode="json") == default, path
    changed = load_config(None, ["trial.lora.r=32", "num_trials=3", "trial.optim.learning_rate=2e-3",
                                 "resources.custom_per_worker={A10G: 1}", "mlflow.experiment=mine"])
    assert (changed.trial.lora.r, changed.num_trials, changed.trial.optim.learning_rate) == (32, 3, 2e-3)
    assert changed.resources.custom_per_worker == {"A10G": 1.0} and changed.mlflow.experiment == "mine"
    assert "r: 32" in dump_config(changed)


@pytest.mark.parametrize("item, words", [
    ("trial.lora.rank=8", ["trial.lora.rank", "unknown"]),
    ("num_trials=zero", ["num_trials"]),
    ("num_trials", ["KEY=VALUE"]),
])
def test_a_bad_set_is_one_line_naming_the_field(item, words):
    with pytest.raises(SettingsError) as err:
        load_config(None, [item])
    msg = str(err.value)
    assert "\n" not in msg and all(w.lower() in msg.lower() for w in words), msg
