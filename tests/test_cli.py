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
    (["--set", "objective.metric=accuracy"], "objective.metric 'accuracy' is not reported by task 'classification'; use one of val_f1"),
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


# ---------------------------------------------------------------------------------------------------------------
# Every kind of bad input, through the real entry point without --dry-run: refused with one line that names the file
# (and line) or the field, exit code 2, no traceback, and Ray never started (a sentinel replaces its start-up).

def _bad_inputs(d: Path) -> dict[str, tuple[list[str], str]]:
    (d / "broken.jsonl").write_text('{"text": "hi", "label": "ham"}\n{"text": "oops", "label": \n')
    (d / "nocol.jsonl").write_text('{"msg": "hi", "label": "ham"}\n')
    (d / "badlabel.tsv").write_text("ham\thello\nmaybe\tfree prize now\n")
    (d / "four.tsv").write_text("ham\ta\nham\tb\nspam\tc\nspam\td\n")
    (d / "allham.tsv").write_text("".join(f"ham\tmessage number {i}\n" for i in range(60)))
    (d / "notok").mkdir()
    (d / "notok" / "config.json").write_text("{}")
    (d / "afile").write_text("")
    (d / "unknown.yaml").write_text("params:\n  lora.rank: {type: choice, values: [4, 8]}\n")
    (d / "lowhigh.yaml").write_text("params:\n  optim.learning_rate: {type: loguniform, low: 1.0e-2, high: 1.0e-3}\n")
    (d / "nonnum.yaml").write_text("params:\n  optim.learning_rate: {type: loguniform, low: abc, high: 1.0e-3}\n")
    (d / "lowover.yaml").write_text("params:\n  data.oversample_minority: {type: uniform, low: 0.05, high: 0.3}\n")
    (d / "bad.yaml").write_text("name: x\nnum_trials: [1,\n")
    (d / "badkey.yaml").write_text("name: x\nnum_trialz: 3\n")
    s = lambda *kv: [a for x in kv for a in ("--set", x)]  # noqa: E731
    return {
        "missing data file": (s("trial.data.path=missing.tsv"), "missing.tsv: data file not found; set data.path"),
        "malformed JSONL line": (s(f"trial.data.path={d}/broken.jsonl"), "broken.jsonl:2: malformed JSON"),
        "missing text column": (s(f"trial.data.path={d}/nocol.jsonl"), "nocol.jsonl:1: no column 'text'"),
        "label outside the map": (s(f"trial.data.path={d}/badlabel.tsv"),
                                  "badlabel.tsv:2: label 'maybe' is not in data.label_map"),
        "empty split": (s(f"trial.data.path={d}/four.tsv"), "four.tsv: the validation split is empty"),
        "minority absent from training": (s(f"trial.data.path={d}/allham.tsv"),
                                          "allham.tsv: minority label 'spam' is absent from the train split"),
        "unknown key in config": (s("num_trial=3"), "num_trial: unknown key; known keys here: "),
        "unknown key in config file": (["--config", str(d / "badkey.yaml")], "badkey.yaml (with --set/--name): num_trialz: unknown key"),
        "invalid YAML": (["--config", str(d / "bad.yaml")], "bad.yaml:3: not valid YAML"),
        "unknown key in space": (s(f"space={d}/unknown.yaml"), "unknown.yaml: params.lora.rank: not a trial setting"),
        "low > high": (s(f"space={d}/lowhigh.yaml"), "lowhigh.yaml: params.optim.learning_rate: low <= high"),
        "non-numeric range": (s(f"space={d}/nonnum.yaml"), "params.optim.learning_rate: low must be a number"),
        "LoRA rank <= 0": (s("trial.lora.r=0"), "trial.lora.r: Input should be greater than 0"),
        "oversampling outside (0, 1)": (s("trial.data.oversample_minority=1.5"),
                                        "trial.data.oversample_minority: Input should be less than 1"),
        "oversampling below the natural ratio": (s(f"space={d}/lowover.yaml"),
                                                 "params.data.oversample_minority: 0.05 is below the natural"),
        "model directory missing": (s("trial.model.name_or_path=./no-such-model"),
                                    "directory ./no-such-model does not exist"),
        "model without tokenizer": (s(f"trial.model.name_or_path={d}/notok"), "notok has no tokenizer files"),
        "GPUs where none exist": (s("resources.gpus_per_worker=1"), "set resources.gpus_per_worker=0"),
        "unwritable output dir": (s(f"output_dir={d}/afile/runs"), "output_dir: " + f"{d}/afile/runs is not writable"),
        "MLflow not answering": (s("mlflow.tracking_uri=http://127.0.0.1:9"),
                                 "mlflow.tracking_uri: http://127.0.0.1:9 does not answer"),
        "trainable not importable": (s("trainable=nope.mod:run"), "trainable: cannot load 'nope.mod:run'"),
        "resume of nothing": (["--resume", "--name", "never-ran"], "--resume: no search to resume"),
    }


def test_every_bad_input_is_refused_before_ray_starts(capsys, tmp_path, monkeypatch):
    import ray

    import search.driver

    def ray_must_not_start(*a, **k):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(search.driver, "_start_ray", ray_must_not_start)
    cases = _bad_inputs(tmp_path)
    out_dir = tmp_path / "runs"
    for name, (argv, message) in cases.items():
        code, out, err = _run(capsys, "--set", f"output_dir={out_dir}",
                              "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *argv)
        assert code == 2, (name, err, out)
        assert err.startswith("error: ") and message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err + out, (name, err)
        assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists(), name
    assert len(cases) >= 20


def test_4bit_without_bitsandbytes_is_refused(capsys, tmp_path, monkeypatch):
    """bitsandbytes is installed here; `sys.modules[...] = None` makes its import fail as on a machine without it."""
    import ray

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, out, err = _run(capsys, "--set", f"output_dir={tmp_path}", "--set", "trial.model.quantization=4bit")
    assert code == 2 and "trial.model.quantization: 4bit needs bitsandbytes; pip install bitsandbytes" in err
    assert err.count("\n") == 1 and "Traceback" not in err and not ray.is_initialized()


def test_a_refusal_in_a_fresh_process_is_one_line(tmp_path):
    """In a fresh interpreter, where the import of bitsandbytes (before the refusal) runs and may log: where the
    `kernels` package is installed (transformers 5.25 pulls it in), bitsandbytes' CPU backend asks it for a hub kernel
    at import and it logs a notice. Tests in this process import bitsandbytes once, so only a subprocess sees this."""
    argv = [sys.executable, "-m", "search.run", "--set", f"output_dir={tmp_path}",
            "--set", "mlflow.tracking_uri=http://127.0.0.1:9"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: mlflow.tracking_uri: http://127.0.0.1:9 does not answer"), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == "", result.stderr
