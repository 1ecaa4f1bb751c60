"""`m3 bench` on a synthetic setup, and the from-scratch tokenizer it uses."""

import json

import pytest

from m3cli.bench import pseudo_texts, ratios
from m3cli.tokenizer import train_bpe

from cli_helpers import assert_user_error, m3


def test_bpe_tokenizer_round_trips():
    texts = pseudo_texts(200, seed=1)
    tok = train_bpe(texts, vocab_size=600)
    assert 259 < len(tok) <= 600
    ids = tok(texts[0])["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == texts[0]
    assert tok.decode(tok("Ünïcode — ok?", add_special_tokens=False)["input_ids"]) == "Ünïcode — ok?"


def test_pseudo_texts_are_deterministic():
    assert pseudo_texts(3, seed=5) == pseudo_texts(3, seed=5) != pseudo_texts(3, seed=6)


def test_bench_json_has_every_mode_and_batch(tmp_path):
    result = m3(
        "bench",
        "--model",
        "tiny",
        "--synthetic-refs",
        "40",
        "--embedder",
        "self",
        "--batch-size",
        "1,2",
        "--prompt-len",
        "16",
        "--max-new-tokens",
        "6",
        "--memories",
        "2",
        "--repeats",
        "1",
        "--json",
        "--workdir",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["results"]
    assert sorted((r["mode"], r["batch"]) for r in rows) == sorted(
        (m, b) for m in ("none", "memory", "rag") for b in (1, 2)
    )
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 6
        assert r["ttft"] > 0  # a separate one-token call: no timing comparison (tiny runs are noise)
        # the same call's first token, and the rate of the 5 tokens after it (from times rounded to 1e-4 s)
        assert 0 < r["first_token_s"] < r["total_s"]
        after = r["total_s"] - r["first_token_s"]
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 5 / after, rel=2e-4 / after)
        # each figure is rounded to 4 decimals on its own, so the parts may exceed the total by 1e-4
        assert r["total_s"] >= r.get("decode_s", 0) + r.get("prefill_s", 0) - 1.5e-4
    mem = [r for r in rows if r["mode"] == "memory"][0]
    assert mem["retrieval_s"] > 0 and mem["memory_load_s"] > 0
    rag = [r for r in rows if r["mode"] == "rag"][0]
    assert rag["prompt_tokens"] > 16  # references in front of the prompt
    assert [x["batch"] for x in out["ratios"]] == [1, 2] and "memory_vs_rag" in out["ratios"][0]
    assert out["setup"]["bank_refs"] == 40 and out["setup"]["dtype"] == "float32"
    # the synthetic model and bank are kept in --workdir and bound to each other
    bank = next(tmp_path.glob("*.m3bank"))
    check = m3("inspect", bank, "--verify")
    assert check.exit_code == 0, check.output
    # a model dir and closed book only: no bank needed
    model_dir = next(p for p in tmp_path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    closed = m3(
        "bench",
        "--model",
        model_dir,
        "--modes",
        "none",
        "--batch-size",
        "1",
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    )
    assert closed.exit_code == 0, closed.output
    assert [r["mode"] for r in json.loads(closed.stdout)["results"]] == ["none"]


def test_ratios():
    rows = [
        {"mode": "none", "batch": 1, "tokens_per_s": 10.0, "ttft": 0.4, "decode_tokens_per_s": 12.0},
        {"mode": "memory", "batch": 1, "tokens_per_s": 9.5, "ttft": 0.44, "decode_tokens_per_s": 11.7},
        {"mode": "rag", "batch": 1, "tokens_per_s": 4.0, "ttft": 1.2, "decode_tokens_per_s": 9.0},
        {"mode": "none", "batch": 2, "tokens_per_s": 18.0, "ttft": 0.5},  # one new token: no decoding rate
        {"mode": "memory", "batch": 2, "tokens_per_s": 17.0, "ttft": 0.55},
    ]
    assert ratios(rows) == [
        {
            "batch": 1,
            "memory_vs_none": 0.95,
            "memory_vs_rag": 2.375,
            "none_vs_rag": 2.5,
            "decode_memory_vs_none": 0.975,
            "decode_memory_vs_rag": 1.3,
            "decode_none_vs_rag": 1.333,
            "ttft_memory_vs_none": 1.1,
            "ttft_rag_vs_none": 3.0,
        },
        {"batch": 2, "memory_vs_none": 0.944, "ttft_memory_vs_none": 1.1},
    ]


def test_bench_errors(tmp_path):
    assert_user_error(m3("bench", "--model", "tiny", "--batch-size", "x"), "--batch")
    assert_user_error(m3("bench", "--model", "tiny", "--modes", "none,fast"), "unknown mode")
    assert_user_error(m3("bench", "--model", "tiny", "--bank", tmp_path / "x.m3bank"), "needs a model dir")
    assert_user_error(m3("bench", "--model", "nonesuch"), "nonesuch")
