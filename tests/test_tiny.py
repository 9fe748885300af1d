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
