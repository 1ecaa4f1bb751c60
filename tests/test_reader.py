"""`m3 pretrain --train reader`: the memory reader that teaches a pretrained model to read memory
(issue #22), on the tiny configuration of the same code path the GPU runs."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_user_error, kill_after_checkpoint, m3
from m3cli.attention import Memory, attention_reference
from m3cli.checkpoint import load_model_dir, load_tokenizer, model_fingerprint, save_model_dir, weights_fingerprint
from m3cli.errors import M3Error
from m3cli.reader import apply_reader, read_reader
from m3cli.reader_train import IGNORE, pack, read_examples, segments


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small model warmed up on one set of invented people (s), and a bank it encoded of other
    people (s2) whose question documents are the training text: their answers are only in the bank."""
    d = tmp_path_factory.mktemp("reader")
    assert m3("synth", "-o", d / "s", "--people", "40", "--seed", "1").exit_code == 0
    assert m3("synth", "-o", d / "s2", "--people", "40", "--seed", "2", "--qa-only").exit_code == 0
    warm = d / "warm"
    result = m3(
        "pretrain",
        d / "s" / "train.parquet",
        "-o",
        warm,
        "--preset",
        "mini",
        "--steps",
        "40",
        "--batch-size",
        "8",
        "--seq-len",
        "128",
        "--lr",
        "3e-3",
        "-q",
    )
    assert result.exit_code == 0, result.output
    bank = d / "kb.m3bank"
    assert m3("encode", d / "s2" / "kb.parquet", "-o", bank, "-m", warm, "-q").exit_code == 0
    return d, warm, bank


def reader_args(d, bank, warm, *extra, steps=16):
    return [
        "pretrain",
        d / "s2" / "train.parquet",
        "--init-from",
        warm,
        "--stage",
        "continual",
        "--bank",
        bank,
        "--train",
        "reader",
        "--reader-rank",
        "8",
        "--memory-layers",
        "all",
        "--memory-top-k",
        "8",
        "--memories",
        "1",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--seq-len",
        "128",
        "--lr",
        "2e-2",
        "--warmup-steps",
        "2",
        "--save-every",
        "4",
        "--log-every",
        "4",
        "-q",
        *extra,
    ]


def test_reader_loss_falls_a_killed_run_resumes_exactly_and_the_reader_file_round_trips(base, tmp_path):
    d, warm, bank = base
    args = reader_args(d, bank, warm)
    result = m3(*args, "-o", tmp_path / "a", "--profile", "2")
    assert result.exit_code == 0, result.output
    profile = (tmp_path / "a.train" / "profile.txt").read_text()  # where a step's time goes
    assert profile.startswith("m3 pretrain --train reader --profile: 2 steps on cpu") and "aten::" in profile
    metrics = [json.loads(x) for x in (tmp_path / "a.train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12, 16]
    assert all(m["stage"] == "continual-reader" and m["tokens_per_s"] > 0 and "mfu" in m for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2, metrics  # it learns to read the answers
    summary = json.loads((tmp_path / "a.train" / "summary.json").read_text())
    assert summary["train"] == "reader" and summary["tokens_per_s"] > 0 and summary["reader_parameters"] > 0
    # resuming a finished run trains nothing and reports the run's last loss and speed again
    again = m3(*args, "-o", tmp_path / "a", "--resume")
    assert again.exit_code == 0 and f"final loss {metrics[-1]['loss']:.4f}, " in again.output, again.output

    # going on from a trained reader (--init-reader): it starts where that one ended, and its file
    # still applies to the base it was trained on
    trained_file = tmp_path / "a.train" / "reader.safetensors"
    more = m3(*reader_args(d, bank, warm, steps=4), "-o", tmp_path / "c", "--init-reader", trained_file)
    assert more.exit_code == 0, more.output
    first = json.loads((tmp_path / "c.train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < metrics[0]["loss"] - 0.2, (first, metrics[0])
    apply_reader(load_model_dir(warm), tmp_path / "c.train" / "reader.safetensors", None, weights_fingerprint(warm))
    assert_user_error(  # the reader sets the memory tokens
        m3(
            *reader_args(d, bank, warm, steps=4),
            "-o",
            tmp_path / "e",
            "--init-reader",
            trained_file,
            "--memory-top-k",
            "4",
        ),
        "cannot change",
    )
    assert_user_error(m3(*reader_args(d, bank, warm), "-o", tmp_path / "e", "--init-reader", tmp_path / "nope"), "nope")

    # killed after a checkpoint, resumed: the same reader, bit for bit
    kill_after_checkpoint(args, tmp_path / "b", step=8, timeout=300)
    result = m3(*args, "-o", tmp_path / "b", "--resume")
    assert result.exit_code == 0, result.output
    a = load_file(str(tmp_path / "a.train" / "reader.safetensors"))
    b = load_file(str(tmp_path / "b.train" / "reader.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the reader file applied to the base model is the trained model: same weights, same fingerprint
    meta, tensors = read_reader(tmp_path / "a.train" / "reader.safetensors")
    assert meta["base_fingerprint"] == model_fingerprint(warm) and meta["base_weights"] == weights_fingerprint(warm)
    assert meta["config"]["memory_reader_rank"] == 8 and meta["config"]["memory_layers"] == list(
        range(load_model_dir(warm).config.n_layers)
    )
    trained = load_model_dir(tmp_path / "a")
    applied = apply_reader(load_model_dir(warm), tmp_path / "a.train" / "reader.safetensors", model_fingerprint(warm))
    assert applied.config == trained.config
    sa, sb = applied.state_dict(), trained.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("mem_o_b"))  # it trained

    # reading no memory, the trained model computes exactly what the base did (closed book, RAG)
    plain = load_model_dir(warm)
    ids = torch.randint(3, plain.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(plain(ids), trained(ids))
    # banks stay bound to the model that reads them
    assert_user_error(m3("eval", "-m", tmp_path / "a", "-b", bank, "--qa", d / "s" / "qa_unseen.jsonl"), "re-encode")


def moved_reader(warm, rank: int, seed: int):
    """The warm model reading memory in every layer through a reader of `rank` whose b factors
    were moved off zero (seeded), so the reader changes what the model computes."""
    model = load_model_dir(warm)
    model.config = model.config.replace(memory_layers=tuple(range(model.config.n_layers)))
    model.enable_reader(rank)
    torch.manual_seed(seed)
    for layer in model.layers:
        layer.attn.mem_q_b.data.normal_(0, 0.5)
        layer.attn.mem_o_b.data.normal_(0, 0.5)
    return model


def test_the_reader_reads_memory_and_starts_as_the_identity(base):
    """A fresh reader (zero b factors) leaves every output unchanged, memory or not; once its
    factors move, only tokens that read memories change."""
    _, warm, _ = base
    model = load_model_dir(warm)
    model.config = model.config.replace(memory_layers=tuple(range(model.config.n_layers)))
    torch.manual_seed(0)
    refs = torch.randint(3, model.config.vocab_size, (3, 12))
    enc = model.encode_references(refs, torch.tensor([12, 9, 12]))
    ids = torch.randint(3, model.config.vocab_size, (1, 10))
    visible = torch.zeros(1, 10, 3, dtype=torch.bool)
    visible[0, 5:] = True  # the first five tokens read nothing
    memory = Memory(kv=enc.kv[None], valid=enc.valid[None], sink=model.encode_prefix(), visible=visible)
    with torch.no_grad():
        before = model(ids, memory=memory)
        model.enable_reader(3)
        assert torch.allclose(model(ids, memory=memory), before, atol=1e-5)
        for layer in model.layers:
            layer.attn.mem_q_b.normal_(0, 0.5)
            layer.attn.mem_o_b.normal_(0, 0.5)
        after = model(ids, memory=memory)
    assert torch.allclose(after[:, :5], before[:, :5], atol=1e-5)
    assert (after[:, 5:] - before[:, 5:]).abs().max() > 1e-3


def test_a_trainers_valid_flags_change_nothing(base):
    """Memory.prepared["valid_flags"] (what a trainer knows of its memories, to spare host syncs)
    gives exactly what the model works out itself, empty slots included."""
    _, warm, _ = base
    model = moved_reader(warm, rank=3, seed=1)
    refs = torch.randint(3, model.config.vocab_size, (3, 12))
    enc = model.encode_references(refs, torch.tensor([12, 2, 12]), top_k=4)  # a short one: some keys not real
    # what the trainer relies on: a reference's real keys are the same in every layer and head
    assert (enc.valid == enc.valid[:, :1, :1]).all() and not enc.valid[1].all() and enc.valid[0].all()
    valid = enc.valid[None].clone()
    valid[:, 2] = False  # an empty slot
    ids = torch.randint(3, model.config.vocab_size, (1, 10))
    visible = torch.zeros(1, 10, 3, dtype=torch.bool)
    visible[0, 3:] = True

    def run(flags):
        memory = Memory(kv=enc.kv[None], valid=valid, sink=model.encode_prefix(), visible=visible)
        if flags is not None:
            memory.prepared["valid_flags"] = flags
        with torch.no_grad():
            return model(ids, memory=memory)

    # the same as the model works out, and as the path that masks every layer and head apart
    assert torch.equal(run(None), run((True, False)))
    assert torch.allclose(run((True, False)), run((False, False)), atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_split_reader_attention_is_the_doubled_head_form(base, impl, monkeypatch):
    """`reader_attention` (explicit, what generation and CPUs use) computes what the fused
    doubled-head form computes (training on a GPU): outputs, gradients, a cached prefill and
    decoding steps, and the attention each memory slot gets (citations)."""
    import m3cli.model as model_mod
    from m3cli.attention import KVCache, score_gaps

    _, warm, _ = base
    model = load_model_dir(warm)
    model.config = model.config.replace(memory_layers=tuple(range(model.config.n_layers)))
    model.attn_impl = impl
    model.enable_score_prior()
    model.enable_reader(4)
    torch.manual_seed(2)
    for layer in model.layers:
        layer.attn.mem_q_b.data.normal_(0, 0.5)
        layer.attn.mem_o_b.data.normal_(0, 0.5)
    model.memory_score_gain.data.normal_(0, 0.05)
    refs = torch.randint(3, model.config.vocab_size, (4, 12))
    with torch.no_grad():
        enc = model.encode_references(refs, torch.tensor([12, 5, 12, 9]))
        sink = model.encode_prefix()
    valid = enc.valid[None].clone()
    valid[:, 3] = False
    scores = score_gaps(torch.tensor([[[0, 1], [2, 3]]]), -torch.rand(1, 2, 2))
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    visible = torch.zeros(1, 12, 4, dtype=torch.bool)
    visible[0, 2:7, :2] = True
    visible[0, 7:, 2:] = True

    def memory(vis=visible):
        return Memory(kv=enc.kv[None], valid=valid, sink=sink, visible=vis, scores=scores)

    def run(mode):
        monkeypatch.setattr(model_mod, "READER_ATTENTION", mode)
        model.zero_grad(set_to_none=True)
        probe: list = []
        out = model(ids, memory=memory(), attention_probe=probe)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():  # generation: a prefill, then decoding steps that read the last chunk's slots
            cache = KVCache(model.config.n_layers)
            steps = [model(ids[:, :8], memory=memory(visible[:, :8]), cache=cache)]
            for t in range(8, 12):
                steps.append(model(ids[:, t : t + 1], memory=memory(None), cache=cache))
        return out.detach(), grads, torch.stack([p_.detach() for p_ in probe]), torch.cat(steps, dim=1)

    split, doubled = run("split"), run("doubled")
    assert torch.allclose(split[0], doubled[0], atol=1e-4), (split[0] - doubled[0]).abs().max()
    assert split[1].keys() == doubled[1].keys() and split[1]
    for n in split[1]:
        assert torch.allclose(split[1][n], doubled[1][n], atol=1e-5, rtol=1e-3), n
    assert torch.allclose(split[2], doubled[2], atol=1e-5)
    assert torch.allclose(split[3], doubled[3], atol=1e-4)
    assert float(split[2].sum()) > 0  # memories were read


def test_packed_segments_see_only_themselves():
    """segment_ids: each packed example computes what it computes alone, from position 0."""
    from m3cli.config import M3Config
    from m3cli.model import Memory3Model

    torch.manual_seed(0)
    model = Memory3Model(
        M3Config(
            vocab_size=50,
            hidden_size=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            intermediate_size=64,
            context_length=64,
            head_dim=8,
        )
    ).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    row = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None] + model.config.context_offset
    with torch.no_grad():
        packed = model(row, position_ids=pos, segment_ids=seg)
        assert torch.allclose(packed[:, :7], model(a), atol=1e-5)
        assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)


def test_chat_examples_score_the_answer_and_read_their_question_memories(base):
    _, warm, _ = base
    tok = load_tokenizer(warm)
    tok.chat_template = (
        "{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    ex = [{"prompt": "Where was Ada born?", "answer": "In Rome."}, {"text": "Ada was born in Rome. " * 30}]
    segs = segments(ex, tok, seq_len=64, chunk=16)
    chat, texts = segs[0], segs[1:]
    answer = tok("In Rome.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert chat.ids[-len(answer) :] == answer
    targets = [t for t, on in zip(chat.ids[1:], chat.loss) if on]
    assert targets == answer  # the loss is on the answer and its end token, nothing else
    assert "Ada" in chat.queries[-1] and "assistant" not in chat.queries[-1]
    assert chat.token_query[-1] == len(chat.queries) - 1  # the answer reads its question's memories
    assert len(texts) > 1 and all(len(s.ids) <= 64 for s in texts)  # long text is cut into rows
    assert all(q and q in tok.decode(s.ids, skip_special_tokens=True) for s in texts for q in s.queries)

    packed, queries = pack(segs, 64, seed=0, fill=0)
    for r in range(packed.ids.shape[0]):
        for s in set(packed.segment[r].tolist()) - {-1}:
            at = packed.segment[r] == s
            assert (packed.position[r][at] == range(at.sum())).all()  # positions restart per example
    n_scored = sum(sum(s.loss) for s in segs)
    assert (packed.targets != IGNORE).sum() == n_scored
    assert sorted(queries) == sorted(q for s in segs for q in s.queries if q is not None)


def test_reader_files_are_checked(base, tmp_path):
    _, warm, _ = base
    with pytest.raises(M3Error, match="does not exist"):
        read_reader(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(M3Error, match="not"):
        read_reader(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(M3Error, match="not an m3 reader"):
        read_reader(tmp_path / "plain.safetensors")
    model = load_model_dir(warm)
    model.enable_reader(2)
    from m3cli.reader import save_reader

    good = save_reader(model, tmp_path / "r.safetensors", "sha256:" + "0" * 64)
    with pytest.raises(M3Error, match="trained on the model"):
        apply_reader(load_model_dir(warm), good, model_fingerprint(warm))
    # bound to the base's config and weights: tokenizer files written another way do not matter
    # (transformers versions differ), other weights do
    bound = save_reader(model, tmp_path / "w.safetensors", "sha256:" + "0" * 64, weights_fingerprint(warm))
    retok = tmp_path / "retok"
    shutil.copytree(warm, retok)
    cfg_file = retok / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_max_length": 123}))
    assert model_fingerprint(retok) != model_fingerprint(warm) and weights_fingerprint(retok) == weights_fingerprint(
        warm
    )
    applied = apply_reader(load_model_dir(retok), bound, model_fingerprint(retok), weights_fingerprint(retok))
    assert applied.config.memory_reader_rank == 2
    with pytest.raises(M3Error, match="records no base"):  # nothing to check the weights against
        apply_reader(load_model_dir(warm), good, None, weights_fingerprint(warm))
    meta_w, tensors_w = read_reader(bound)
    save_file(
        tensors_w,
        str(tmp_path / "badw.safetensors"),
        metadata={"m3.reader": json.dumps({**meta_w, "base_weights": "x"})},
    )
    with pytest.raises(M3Error, match="incomplete"):
        read_reader(tmp_path / "badw.safetensors")
    other = load_model_dir(warm)
    with torch.no_grad():
        other.output_weight().mul_(2)
    save_model_dir(other, load_tokenizer(warm), tmp_path / "other")
    with pytest.raises(M3Error, match="trained on the model"):
        apply_reader(
            load_model_dir(tmp_path / "other"),
            bound,
            model_fingerprint(tmp_path / "other"),
            weights_fingerprint(tmp_path / "other"),
        )
    meta, tensors = read_reader(good)
    tensors["layers.0.attn.mem_q_a"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"m3.reader": json.dumps(meta)})
    with pytest.raises(M3Error, match="shape"):
        apply_reader(load_model_dir(warm), tmp_path / "bad.safetensors")
    tensors = dict(read_reader(good)[1])
    tensors["layers.0.attn.mem_o_b"] = torch.full_like(tensors["layers.0.attn.mem_o_b"], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"m3.reader": json.dumps(meta)})
    with pytest.raises(M3Error, match="NaN"):
        apply_reader(load_model_dir(warm), tmp_path / "nan.safetensors")


def test_reader_training_errors(base, tmp_path):
    d, warm, bank = base
    train = d / "s" / "train.parquet"
    assert_user_error(
        m3("pretrain", train, "-o", tmp_path / "x", "--init-from", warm, "--stage", "continual", "--train", "reader"),
        "--bank",
    )
    assert_user_error(m3(*reader_args(d, bank, warm, "--reader-rank", "0"), "-o", tmp_path / "x"), "--reader-rank")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no"}\n')
    assert_user_error(m3("pretrain", bad, *reader_args(d, bank, warm)[2:], "-o", tmp_path / "x"), "needs")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_default_model_is_made_once_even_when_two_processes_start_together(tmp_path, monkeypatch):
    """`--model default`: the packaged SmolLM2, converted, with the shipped memory reader applied,
    materialised once into M3_HOME; two processes asking at once get the same, whole model dir."""
    from m3cli.default_model import SHIPPED_READER

    env = {**os.environ, "M3_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    code = "from m3cli.default_model import default_model; print(default_model())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert path.parent == tmp_path / "home" / "models"
    assert sum("materialising the default model" in o[1] for o in outs) == 1  # one of them made it
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]
    model = load_model_dir(path)
    assert model.config.vocab_size == 49152 and model.config.n_layers == 30
    if SHIPPED_READER.is_file():
        meta, _ = read_reader(SHIPPED_READER)
        assert model.config.memory_reader_rank == meta["config"]["memory_reader_rank"]
        assert list(model.config.mem_layers) == meta["config"]["memory_layers"]
    # the CLI takes the word `default` for a model dir, and finds the one made above
    monkeypatch.setenv("M3_HOME", str(tmp_path / "home"))
    result = m3("score", "--model", "default", "The capital of France is Paris.", "--json")
    assert result.exit_code == 0, result.output
    assert "materialising" not in result.stderr and json.loads(result.stdout)["perplexity"] > 1


def test_max_time_stops_at_a_checkpoint_that_resume_continues(base, tmp_path):
    d, warm, bank = base
    args = reader_args(d, bank, warm, steps=6)
    result = m3(*args, "-o", tmp_path / "m", "--max-time", "1e-9")
    assert result.exit_code == 0, result.output
    assert "stopped at step 1 of 6" in result.stdout and not (tmp_path / "m").exists()
    assert json.loads((tmp_path / "m.train" / "checkpoint" / "state.json").read_text())["step"] == 1
    so_far = load_file(str(tmp_path / "m.train" / "checkpoint" / "reader.safetensors"))  # the reader so far, usable
    meta, tensors = read_reader(tmp_path / "m.train" / "reader.safetensors")
    assert meta["base_weights"] == weights_fingerprint(warm) and all(
        torch.equal(so_far[k], tensors[k]) for k in tensors
    )
    result = m3(*args, "-o", tmp_path / "m", "--resume")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file()
    assert json.loads((tmp_path / "m.train" / "summary.json").read_text())["steps"] == 6


def test_a_text_never_reads_the_document_it_excludes(base, tmp_path):
    """`exclude_document`: a training text that is itself in the bank reads its neighbours, not its
    own references (it would learn to copy its continuation, which held-out text never allows)."""
    from m3cli.bank import Bank
    from m3cli.reader_train import retrieve

    d, warm, bank = base
    with Bank(bank) as b:
        ref = b.reference(0)
        doc, text = b.document(ref.doc_index).id, ref.text
    tok = load_tokenizer(warm)
    ex = [{"text": text, "exclude_document": doc}, {"text": text}]
    packed, queries = pack(segments(ex, tok, seq_len=64, chunk=16), 64, seed=0, fill=0)
    assert set(packed.query_exclude) == {doc, None} and len(packed.query_exclude) == len(queries)
    refs, _ = retrieve(queries, bank, 3, 0.99, None, warm, "cpu", lambda *_: None, packed.query_exclude)
    with Bank(bank) as b:
        docs = [[b.document(b.reference(int(r)).doc_index).id for r in row if r >= 0] for row in refs]
    excluding = [i for i, e in enumerate(packed.query_exclude) if e]
    assert excluding and all(doc not in docs[i] and len(docs[i]) == 3 for i in excluding)
    assert any(doc in docs[i] for i, e in enumerate(packed.query_exclude) if not e)  # found without it
    # through `m3 pretrain --train reader`: what it retrieved once for the run never names the document
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text(json.dumps({"text": text * 3, "exclude_document": doc}) + "\n")
    args = reader_args(d, bank, warm, steps=2)
    args[1] = corpus
    assert m3(*args, "-o", tmp_path / "r").exit_code == 0
    with np.load(tmp_path / "r.train" / "retrieval.npz") as z, Bank(bank) as b:
        got = [b.document(b.reference(int(r)).doc_index).id for r in z["refs"].reshape(-1) if r >= 0]
    assert got and doc not in got
    assert "exclude" in json.loads((tmp_path / "r.train" / "retrieval.json").read_text())["key"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "exclude_document": 3}) + "\n")
    with pytest.raises(M3Error, match="exclude_document"):
        read_examples(str(bad))


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_merged_reader_attention_is_the_explicit_form(T, masked):
    """`merged_reader_attention` (two fused CPU kernel calls merged by their log-sum-exps: what a
    prompt's prefill uses on a CPU) computes `reader_attention`'s output and memory contribution,
    with grouped heads, the score prior's bias, per-head masks, a row that reads no memory (nor
    the sink) and a row whose memory keys are partly hidden."""
    from m3cli.attention import merged_reader_attention, merged_reader_available, reader_attention

    g = torch.Generator().manual_seed(T)
    B, H, Hkv, D, p, M, ctx = 3, 6, 2, 8, 2, 10, 9
    N = p + M + ctx
    q, dq = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    bias = -torch.rand(B, H, M, generator=g) * 3
    mask = None
    if masked:
        causal = torch.ones(T, ctx, dtype=torch.bool).tril(ctx - T)
        mask = torch.cat([torch.ones(T, p + M, dtype=torch.bool), causal], -1)[None, None].repeat(B, H, 1, 1)
        mask[0, :, :, : p + M] = False  # reads no memory
        mask[1, 1::2, :, p + 3 : p + 8] = False  # some heads see fewer memory keys
    with torch.no_grad():
        assert merged_reader_available(q)
        want = reader_attention(q, dq, k, v, mask, p, p + M, bias=bias)
        got = merged_reader_attention(q, dq, k, v, mask, p, p + M, bias=bias)
        plain = merged_reader_attention(q, dq, k, v, mask, p, p + M)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    if masked:
        assert torch.all(got[1][0] == 0)  # the row that reads no memory gets nothing from it
    assert not torch.allclose(plain[0], got[0], atol=1e-3)  # the bias is read
    assert not merged_reader_available(q)  # gradients on: the explicit form
    with torch.no_grad():
        assert not merged_reader_available(q.bfloat16())  # bfloat16: the explicit form
        shared = None if mask is None else mask[:, :1] & mask[:, 1:2]  # one mask for every head (B, 1, T, N)
        want = reader_attention(q, dq, k, v, shared, p, p + M, bias=bias)
        got = merged_reader_attention(q, dq, k, v, shared, p, p + M, bias=bias)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def _rounded(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.bfloat16().float() for x in xs]


@pytest.mark.parametrize("masking", [None, "bool", "per-head", "float"])
def test_one_query_attention_in_bfloat16_on_a_cpu_is_the_explicit_form(masking):
    """A decoding step in bfloat16 on a CPU (`attention_one_query`, taken by `attention_sdpa`, and
    `reader_attention_one_query`, the reader's products in float32 from float32 copies of the
    memories) computes the float32 explicit forms of the same rounded inputs to bfloat16's
    precision, through a view of a larger buffer (as the KV cache gives) and with grouped heads;
    in float32, `reader_attention_one_query` is `reader_attention` to float32's."""
    import m3cli.attention as attention
    from m3cli.attention import attention_sdpa, reader_attention, reader_attention_one_query

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, D, p, M, S = 3, 6, 2, 16, 2, 10, 40
    q, dq = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    buf = torch.randn(2, B, Hkv, S + 9, D, generator=g)
    k, v = buf[0, :, :, :S], buf[1, :, :, :S]  # views of a larger buffer, as the cache's
    bias = -torch.rand(B, H, M, generator=g) * 3
    mask = None
    if masking == "bool":
        mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    elif masking == "per-head":
        mask = torch.rand(B, H, 1, S, generator=g) > 0.3
    elif masking == "float":
        mask = torch.randn(B, H, 1, S, generator=g).masked_fill(
            torch.rand(B, H, 1, S, generator=g) > 0.7, float("-inf")
        )
    if mask is not None:
        mask[..., p] = True if mask.dtype == torch.bool else 0.0  # every row sees a key
    calls = []
    original = attention.attention_one_query
    with torch.no_grad():
        torch.testing.assert_close(
            reader_attention_one_query(q, dq, k, v, mask, p, p + M, bias=bias),
            reader_attention(q, dq, k, v, mask, p, p + M, probe=True, bias=bias),
            atol=1e-5,
            rtol=1e-5,
        )
        qr, dqr, kr, vr = _rounded(q, dq, k, v)
        want = attention_reference(qr, kr, vr, mask)
        try:
            attention.attention_one_query = lambda *a: calls.append(1) or original(*a)
            got = attention_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        finally:
            attention.attention_one_query = original
        assert calls and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        want = reader_attention(qr, dqr, kr, vr, mask, p, p + M, bias=bias)[:2]
        kb, vb = k.bfloat16(), v.bfloat16()
        for memory in (None, (kb[:, :, p : p + M].float(), vb[:, :, p : p + M].float())):
            out, mem, _ = reader_attention_one_query(q.bfloat16(), dq.bfloat16(), kb, vb, mask, p, p + M, bias, memory)
            assert out.dtype == torch.bfloat16 and mem.dtype == torch.float32
            torch.testing.assert_close(out.float(), want[0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(mem, want[1], atol=2e-2, rtol=2e-2)
        assert (want[1] - reader_attention(qr, dqr, kr, vr, mask, p, p + M)[1]).abs().max() > 0.05  # bias read


def test_aligned_reader_attention_in_bfloat16_is_the_explicit_form():
    """The chunk-aligned prefill runs in bfloat16 too (`aligned_reader_available`): output, memory
    contribution and citations are the float32 explicit form's on the same rounded inputs."""
    from m3cli.attention import aligned_reader_attention, aligned_reader_available, reader_attention

    g = torch.Generator().manual_seed(4)
    B, H, Hkv, D, p, chunk, per, T = 2, 6, 2, 16, 3, 8, 6, 21
    n = -(-T // chunk)
    M = n * per
    N = p + M + T
    q, dq = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    bias = -torch.rand(B, H, M, generator=g) * 3
    key_ok = torch.rand(B, Hkv, M, generator=g) > 0.4
    key_ok[..., ::per] = True
    mask = torch.cat(
        [
            torch.ones(T, p, dtype=torch.bool),
            (torch.arange(T) // chunk)[:, None] == (torch.arange(M) // per)[None, :],
            torch.ones(T, T, dtype=torch.bool).tril(),
        ],
        -1,
    )[None, None].repeat(B, H, 1, 1)
    mask[..., p : p + M] &= key_ok.repeat_interleave(H // Hkv, dim=1)[:, :, None, :]
    qr, dqr, kr, vr = _rounded(q, dq, k, v)
    with torch.no_grad():
        assert aligned_reader_available(q.bfloat16())
        out, mem, share = aligned_reader_attention(
            q.bfloat16(), dq.bfloat16(), k.bfloat16(), v.bfloat16(), p, p + M, chunk, bias, key_ok, 3
        )
        want = reader_attention(qr, dqr, kr, vr, mask, p, p + M, probe=True, bias=bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want[0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(mem.float(), want[1], atol=3e-2, rtol=3e-2)
    slots = want[2][..., p : p + M].reshape(B, H, T, M // 3, 3).sum(-1).mean(1)
    torch.testing.assert_close(share, slots, atol=1e-2, rtol=1e-2)


def test_a_bfloat16_model_decodes_with_memory_as_float32_does(base, monkeypatch):
    """A bfloat16 model's decoding steps on a CPU take the one-query forms with the reader's
    factors in float32 (`Attention._reader_float`), give the float32 model's logits to
    bfloat16's precision, and see a change to the reader's factors at once."""
    import m3cli.model as model_mod
    from m3cli.attention import KVCache

    _, warm, _ = base
    model = moved_reader(warm, rank=4, seed=5)
    refs = torch.randint(3, model.config.vocab_size, (3, 12))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    low = copy.deepcopy(model).to(torch.bfloat16)
    calls = []
    original = model_mod.reader_attention_one_query
    monkeypatch.setattr(model_mod, "reader_attention_one_query", lambda *a, **k: calls.append(1) or original(*a, **k))

    def decode(m, probe=None):
        with torch.no_grad():
            enc = m.encode_references(refs, torch.tensor([12, 5, 12]))
            kv = enc.kv[None].expand(2, -1, -1, -1, -1, -1, -1)
            valid = enc.valid[None].expand(2, -1, -1, -1, -1)
            cache = KVCache(m.config.n_layers)
            m(ids[:, :8], cache=cache)
            memory = Memory(kv=kv, valid=valid, sink=m.encode_prefix())
            steps = [m(ids[:, t : t + 1], memory=memory, cache=cache, attention_probe=probe) for t in range(8, 12)]
            return torch.cat(steps, dim=1).float()

    want = decode(model)
    assert not calls  # float32: the explicit form
    got = decode(low)
    assert len(calls) == 4 * model.config.n_layers
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.05 * scale, ((got - want).abs().max(), scale)
    probes: tuple[list, list] = ([], [])  # citations: the same path, each memory's share as float32's
    assert torch.equal(decode(low, probes[0]), got)
    decode(model, probes[1])
    assert len(calls) == 8 * model.config.n_layers and len(probes[0]) == len(probes[1]) == 4 * model.config.n_layers
    torch.testing.assert_close(torch.stack(probes[0]), torch.stack(probes[1]), atol=2e-2, rtol=5e-2)
    assert float(torch.stack(probes[1]).sum()) > 0
    with torch.no_grad():  # a changed factor is read at once
        for layer in [*low.layers, *model.layers]:
            layer.attn.mem_o_b.zero_()
    assert (decode(low) - decode(model)).abs().max() < 0.05 * scale
    assert (decode(low) - got).abs().max() > 1e-3


@pytest.mark.parametrize("T", [5, 16, 23])
@pytest.mark.parametrize("layer", ["reader", "memory", "plain"])
@pytest.mark.parametrize("hidden", [None, "shared", "per-head"])
def test_aligned_reader_attention_is_the_explicit_form(T, layer, hidden):
    """`aligned_reader_attention` (a prompt from its first token, each chunk reading its own
    memories: three fused calls, no (tokens x keys) mask) computes what the explicit form does
    under the block mask — context causal, the sink for every token, chunk c's memory keys for
    chunk c's tokens — with the bias, grouped heads and a last chunk shorter than the others; in
    a memory layer without a reader, the same with q alone; in a layer without memories, [sink |
    context]. Memory keys that are not real (a short
    reference) are hidden, for every head alike or per KV head. Asked for citations, each token's
    share of attention per memory slot is what the explicit probabilities give."""
    from m3cli.attention import aligned_reader_attention, reader_attention

    g = torch.Generator().manual_seed(T)
    B, H, Hkv, D, p, chunk, per, slot_keys = 2, 6, 2, 8, 3, 8, 6, 3
    n = -(-T // chunk)
    reads = layer == "reader"
    M = 0 if layer == "plain" else n * per
    N = p + M + T
    q, dq = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    bias = -torch.rand(B, H, M, generator=g) * 3 if M else None
    token_chunk = torch.arange(T) // chunk
    key_chunk = torch.arange(M) // per
    mask = torch.cat(
        [
            torch.ones(T, p, dtype=torch.bool),
            token_chunk[:, None] == key_chunk[None, :],
            torch.ones(T, T, dtype=torch.bool).tril(),
        ],
        -1,
    )[None, None].expand(B, H, T, N)
    key_ok = None
    if hidden is not None and M:
        key_ok = torch.rand(B, 1 if hidden == "shared" else Hkv, M, generator=g) > 0.4
        key_ok[..., ::per] = True  # every chunk keeps a real key
        heads = key_ok.expand(B, Hkv, M).repeat_interleave(H // Hkv, dim=1)  # (B, H, M)
        mask = mask.clone()
        mask[..., p : p + M] &= heads[:, :, None, :]
    with torch.no_grad():
        got = aligned_reader_attention(q, dq if reads else None, k, v, p, p + M, chunk, bias, key_ok, slot_keys)
        if reads:
            want = reader_attention(q, dq, k, v, mask, p, p + M, probe=True, bias=bias)
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
            probs = want[2]
            wrong = aligned_reader_attention(q, dq, k, v, p, p + M, chunk, None, key_ok)
            assert not torch.allclose(wrong[0], want[0], atol=1e-3)  # the bias is read
            assert wrong[2] is None  # no citations asked
        else:
            float_mask = torch.zeros(B, H, T, N).masked_fill(~mask, float("-inf"))
            if bias is not None:
                float_mask[..., p : p + M] += bias[:, :, None, :]
            want = (attention_reference(q, k, v, float_mask), None)
            probs = torch.softmax(q @ k.repeat_interleave(H // Hkv, dim=1).mT / D**0.5 + float_mask, dim=-1)
            assert got[1] is None
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if M:  # citations: each slot's share of each token's attention, averaged over the heads
        share = probs[..., p : p + M].reshape(B, H, T, M // slot_keys, slot_keys).sum(-1).mean(1)
        assert share.abs().sum() > 0
        torch.testing.assert_close(got[2], share, atol=1e-5, rtol=1e-5)
    else:
        assert got[2] is None
