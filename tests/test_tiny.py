import json


from trainables.tiny import TinySpec, build_tiny_model


def test_builder_output_reloads_through_from_pretrained(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen3"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    info = json.loads((tiny_model / "build_info.json").read_text())
    assert info["pretrain_loss_curve"][-1] < info["pretrain_loss_curve"][0]  # pre-training did learn


def test_builder_is_deterministic_given_a_seed(tmp_path):
    from safetensors.torch import load_file

    texts = [f"message number {i} call now to win" if i % 4 == 0 else f"see you at {i} ok" for i in range(200)]
    spec = TinySpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, pretrain_steps=5, pretrain_batch=4, pretrain_seq_len=16)
    a = build_tiny_model(tmp_path / "a", texts, spec)
    b = build_tiny_model(tmp_path / "b", texts, spec)
    c = build_tiny_model(tmp_path / "c", texts, TinySpec(**{**spec.__dict__, "seed": 1}))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_cli_builds_a_loadable_model(tmp_path, sms_subset):
    from trainables.tiny import main

    assert main(["--out", str(tmp_path / "m"), "--data", str(sms_subset), "--pretrain-steps", "0",
                 "--hidden-size", "32", "--layers", "1"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()


_ENSURE = """
import sys
from trainables.settings import DataSettings
from trainables.tiny import TinySpec, ensure_tiny_model
spec = TinySpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                pretrain_steps=5, pretrain_batch=4, pretrain_seq_len=16)
path = ensure_tiny_model(sys.argv[1], DataSettings(path=sys.argv[2]), spec, progress=lambda m: print(m, flush=True))
print("PATH", path, flush=True)
"""


def test_two_processes_needing_the_model_at_once_build_it_once(tmp_path, sms_subset):
    """Two searches started together on a new machine both need the built-in model. Before the lock, both built it
    into one shared `.partial` directory and the second replaced the first's finished directory (seen on
    2026-12-05: two benchmark probes built it at once). Here the test holds the lock until both processes wait on
    it, so both have found no model; then exactly one builds, and the other loads that one."""
    import os
    import subprocess
    import sys

    from filelock import FileLock

    from trainables.settings import DataSettings
    from trainables.tiny import corpus_for

    _texts, corpus_id, _ = corpus_for(DataSettings(path=str(sms_subset)))
    spec = TinySpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, pretrain_steps=5, pretrain_batch=4, pretrain_seq_len=16)
    cache = tmp_path / "cache"
    path = cache / f"tiny-qwen3-{spec.key(corpus_id)}"
    cache.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with FileLock(f"{path}.lock"):
        procs = [subprocess.Popen([sys.executable, "-c", _ENSURE, str(cache), str(sms_subset)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [[], []]
        for p, out in zip(procs, outs):  # each has found no model and waits on the lock the test holds
            for line in p.stdout:
                out.append(line)
                if "waiting for it" in line:
                    break
            assert "waiting for it" in "".join(out), "".join(out)
    for p, out in zip(procs, outs):
        out += p.stdout.readlines()
        assert p.wait(timeout=120) == 0, "".join(out)
    texts = ["".join(o) for o in outs]
    assert sum("written to" in t for t in texts) == 1, texts  # built once
    assert all(f"PATH {path}\n" in t for t in texts)
    assert (path / "build_info.json").exists() and (path / "model.safetensors").exists()
    assert not [d for d in cache.iterdir() if ".partial" in d.name]  # no build left half-written beside it
