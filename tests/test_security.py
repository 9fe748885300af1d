"""Security properties checked on the source and the settings: no unsafe unpickling, no remote code unless asked, no
credentials written. (The scan of everything a real search writes, with secrets planted in its environment, is in
test_reliability.py; the loopback check of the dashboard is in its SIGTERM test.)"""

import ast
from pathlib import Path

from search.tracking import redact
from trainables.settings import TrialSettings

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "search").glob("*.py")) + sorted((ROOT / "trainables").glob("*.py"))


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == name:
                    yield path, node


def _kw(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    for path, node in _calls("load"):
        base = node.func.value if isinstance(node.func, ast.Attribute) else None
        if isinstance(base, ast.Name) and base.id == "torch":
            kw = _kw(node, "weights_only")
            assert isinstance(kw, ast.Constant) and kw.value is True, f"{path}:{node.lineno}"
    for path, node in _calls("loads"):  # no pickle.loads of files in the product code either
        base = node.func.value if isinstance(node.func, ast.Attribute) else None
        assert not (isinstance(base, ast.Name) and base.id in ("pickle", "cloudpickle")), f"{path}:{node.lineno}"


def test_remote_code_only_when_the_user_sets_it():
    assert TrialSettings().model.trust_remote_code is False
    calls = list(_calls("from_pretrained"))
    assert calls
    for path, node in calls:
        kw = _kw(node, "trust_remote_code")
        assert not (isinstance(kw, ast.Constant) and kw.value is True), f"{path}:{node.lineno}"


def test_weights_are_saved_as_safetensors():
    for path, node in _calls("save_pretrained"):
        kw = _kw(node, "safe_serialization")
        assert kw is None or (isinstance(kw, ast.Constant) and kw.value is True), f"{path}:{node.lineno}"


def test_credentials_are_redacted_before_they_are_written(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_notarealtoken123")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-notreal-456")
    text = ("mlflow: {tracking_uri: 'https://alice:pw-notreal-456@mlflow.example.com'}\n"
            "note: hf_notarealtoken123\nplain: sqlite:///mlflow.db s3://bucket/prefix")
    out = redact(text)
    assert "alice" not in out and "pw-notreal-456" not in out and "hf_notarealtoken123" not in out
    assert "https://***@mlflow.example.com" in out and "sqlite:///mlflow.db s3://bucket/prefix" in out
