"""`python -m search.run` validation paths: every bad input is one line on stderr, exit code 2, before Ray starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from search.run import main, plan_resources
from search.config import load_config
from trainables.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_config_space_and_plan(capsys):
    code, out, err = _run(capsys, "--dry-run", "--set", "num_trials=3")
    assert code == 0, err
    assert "# resolved config" in out and "num_trials: 3" in out
    assert "lora.r" in out and "loguniform" in out and "# resource plan" in out and "concurrent trials" in out


@pytest.mark.parametrize("argv, message", [
    (["--set", "num_trial=3"], "num_trial: unknown key; known keys here: "),
    (["--set", "trial.lora.r=0"], "trial.lora.r: Input should be greater than 0 (got 0)"),
    (["--set", "trial.model.quantization=8bit"], "trial.model.quantization"),
    (["--set", "trial.data.path=missing.tsv"], "missing.tsv: data file not found"),
    (["--set", "space=nospace.yaml"], "nospace.yaml: space file not found"),
    (["--set", "trial.model.name_or_path=./no-such-model"], "directory ./no-such-model does not exist"),
    (["--set", "resources.gpus_per_worker=1"], "resources: one trial needs"),
    (["--set", "resources.num_workers=64"], "lower resources.num_workers"),
    (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "mlflow.tracking_uri: http://127.0.0.1:9 does not answer"),
    (["--set", "trial.data.oversample_minority=0.05", "--set", "space=spaces/classification.yaml"],
     None),
    (["--config", "nope.yaml"], "nope.yaml: config file not found"),
    (["--set", "objective.metric=accuracy"], "objective.metric 'accuracy' is not one of"),
    (["--resume", "--name", "never-ran"], "--resume: no search to resume"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, message):
    code, out, err = _run(capsys, "--dry-run", "--set", f"output_dir={tmp_path}", *argv)
    if message is None:  # the space's oversampling range overrides the base value: fine
        assert code == 0
        return
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_space_range_below_natural_ratio_is_refused(capsys, tmp_path):
    space = tmp_path / "low.yaml"
    space.write_text("params:\n  data.oversample_minority: {type: uniform, low: 0.05, high: 0.3}\n")
    code, _, err = _run(capsys, "--dry-run", "--set", f"space={space}")
    assert code == 2 and "params.data.oversample_minority: 0.05 is below the natural minority fraction" in err


def test_resources_never_plan_a_deadlock():
    cfg = load_config(None, ["max_concurrent_trials=4", "resources.cpus_per_worker=1"])
    plan = plan_resources(cfg, {"CPU": 2.0})
    assert plan["concurrency"] == 2  # 4 asked, 2 fit: the trial process itself holds no CPU
    cfg2 = load_config(None, ["resources.num_workers=2", "resources.cpus_per_worker=1.5"])
    with pytest.raises(SettingsError, match=r"one trial needs \{'CPU': 3.0\} but the cluster has CPU=2"):
        plan_resources(cfg2, {"CPU": 2.0})


def test_every_config_file_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        assert (ROOT / cfg.space).exists(), path
        assert path.read_text().startswith("# python -m search.run"), path


def test_help_explains_every_option():
    for module in ("search.run", "search.export", "trainables.tiny"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "usage:" in out.stdout
