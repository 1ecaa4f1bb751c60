"""Shared fixtures: tiny Hugging Face checkpoints built in the test, with a real tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# m3's cache dir (default model, file-hash cache): the tests' own, never the user's
os.environ["M3_HOME"] = __import__("tempfile").mkdtemp(prefix="m3-test-home-")

import pytest  # noqa: E402
import torch  # noqa: E402

WORDS = (
    "the a of to and in is was capital city country born reference paris france rome italy "
    "hello world memory model answer question . , : ?"
).split()


def build_tokenizer():
    """A word-level tokenizer with BOS/EOS, made offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "Reference"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return fast


def build_hf_checkpoint(path, arch: str, seed: int = 0):
    """Save a random tiny LlamaForCausalLM / Qwen2ForCausalLM (safetensors) with a tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False))
    elif arch == "mistral":  # a sliding window shorter than the context
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=32, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # non-trivial norms and biases so that a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.eval().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return model


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "hf-llama"
    model = build_hf_checkpoint(path, "llama")
    return path, model


@pytest.fixture
def qwen_dir(tmp_path):
    path = tmp_path / "hf-qwen2"
    model = build_hf_checkpoint(path, "qwen2")
    return path, model
