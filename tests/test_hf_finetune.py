"""Fine-tuning a Hugging Face LLaMA on the user's documents, as LWM starts from LLaMA-2: convert
keeps its tokenizer, training reads the documents with it, and generate speaks through it."""

import json

import jax
import numpy as np
import pytest
from test_user_data import byte_level_bpe, random_texts, write_jsonl

from model_zoo.__main__ import main
from model_zoo.checkpoint import load_model
from model_zoo.generate import generate
from model_zoo.sharding import make_mesh
from model_zoo.train import read_metrics

# end to end: the first CI leg runs it, the JAX-compatibility legs skip it (tests/conftest.py)
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch", reason="the Hugging Face model is built with torch: pip install torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face model is built with transformers")


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RING_ATTN_DATA_CACHE", str(tmp_path / "cache"))


def test_a_converted_llama_trains_on_documents_and_generates_through_its_own_tokenizer(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
    backend = byte_level_bpe(tmp_path / "bpe.json", vocab_size=400)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(backend), bos_token="<s>",
                                                        eos_token="</s>", unk_token="<unk>")
    hf_tokenizer.save_pretrained(hf_dir)

    assert main(["convert", str(hf_dir), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "tokenizer.json").is_file()

    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in random_texts(80, seed=2, high=600)])
    workdir = tmp_path / "run"
    assert main(["train", "--init-from", str(tmp_path / "converted"), "--data", str(data), "--stages",
                 "128:1e4:6,256:1e5:14", "--batch-size", "4", "--learning-rate", "3e-3", "--mesh", "dp=2,sp=4",
                 "--params-over-sequence", "--workdir", str(workdir), "--no-progress"]) == 0
    losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")]
    assert np.mean(losses[-4:]) < np.mean(losses[:3]) - 0.5, losses
    run = json.loads((workdir / "run.json").read_text())
    assert run["model"]["vocab_size"] == 512 and run["model"]["num_kv_heads"] == 2  # the converted model's shape

    prompt = "def main():"
    capsys.readouterr()
    assert main(["generate", "--model", str(workdir), "--prompt", prompt, "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    # the oracle: transformers' tokenizer around the same greedy generation
    model_config, params = load_model(workdir, mesh=make_mesh(sp=8))
    with jax.set_mesh(make_mesh(sp=8)):
        ids = [hf_tokenizer.bos_token_id] + hf_tokenizer(prompt, add_special_tokens=False).input_ids
        new = generate(params, [ids], config=model_config, max_new_tokens=24, stop_tokens=(2,))[0]
    expected = hf_tokenizer.decode([t for t in new if t != 2], skip_special_tokens=True)
    assert printed == expected and len(printed) > 0
