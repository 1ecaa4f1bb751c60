"""`m3 synth`, `m3 pretrain` and `m3 eval`: schedules, data order, gradient paths, resume, errors."""

import json

import numpy as np
import pytest
import torch
from m3cli.checkpoint import load_tokenizer
from m3cli.train import PAD
from safetensors.torch import load_file

from m3cli.evaluate import first_sentence, is_correct, read_qa
from m3cli.train import TrainArgs, batch_indices, continual_memory, lr_at

from cli_helpers import assert_user_error, kill_after_checkpoint, m3


def test_lr_schedules():
    wsd = TrainArgs(stage="warmup", corpus="x", output="y", config="tiny", steps=100, warmup_steps=10)
    lrs = [lr_at(s, wsd) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:80]) and lrs[99] == pytest.approx(0.1, abs=0.01)
    cos = TrainArgs(
        stage="warmup",
        corpus="x",
        output="y",
        config="tiny",
        steps=100,
        warmup_steps=0,
        schedule="cosine",
        min_lr_ratio=0.0,
    )
    assert lr_at(0, cos) == pytest.approx(1.0) and lr_at(100, cos) == pytest.approx(0.0, abs=1e-9)


def test_batches_are_a_pure_function_of_step():
    a = [batch_indices(s, 50, 8, seed=3).tolist() for s in range(12)]
    b = [batch_indices(s, 50, 8, seed=3).tolist() for s in range(12)]
    assert a == b and a != [batch_indices(s, 50, 8, seed=4).tolist() for s in range(12)]
    epoch = sorted(x for s in range(6) for x in a[s])  # 6 batches of 8 from 50 rows: no repeats
    assert len(set(epoch)) == 48
    # two processes split each global batch
    both = np.concatenate([batch_indices(5, 50, 4, 3, rank=r, world=2) for r in range(2)])
    assert sorted(both.tolist()) == sorted(batch_indices(5, 50, 8, 3).tolist())


class _WordTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}


def test_aligned_packing_starts_every_document_at_a_chunk_boundary():
    from m3cli.train import pack_sequences

    lengths = [5, 20, 3, 9, 17, 1, 40, 2, 7, 15, 16] * 4
    texts = [" ".join([str(10 + i)] * n) for i, n in enumerate(lengths)]
    rows = pack_sequences(texts, _WordTokenizer(), 16, seed=0, align=8)
    starts = []
    for r, row in enumerate(rows):
        for p in np.flatnonzero(row == 1):
            assert p % 8 == 0 and p < 16, (r, p, row)  # never the target-only last position
            starts.append(int(row[p + 1]) if p + 1 < len(row) else int(rows[r + 1][0]))
    # documents lose nothing: every one starts once, in shuffled order, and keeps all its tokens
    assert sorted(starts) == sorted(10 + i for i in range(len(lengths)))
    unaligned = pack_sequences(texts, _WordTokenizer(), 16, seed=0).flatten()
    kept = rows.flatten()[rows.flatten() != PAD]  # without the padding: the same token stream
    n = min(len(kept), len(unaligned))
    assert not (unaligned == PAD).any() and n > 0.6 * len(unaligned) and (kept[:n] == unaligned[:n]).all()


@pytest.mark.parametrize("pad", [None, 2, 0])  # no pad token (a converted GGUF can have none), pad = end token, own pad
def test_aligned_rows_feed_padding_and_keep_every_real_target(pad):
    """Alignment padding is marked by position, not by a token id: a tokenizer without a pad
    token packs too, and where pad = end token the end-of-document targets still count."""
    from m3cli.train import pack_sequences, pad_fill, split_rows

    tok = _WordTokenizer()
    tok.pad_token_id = pad
    texts = [" ".join([str(10 + i)] * n) for i, n in enumerate([5, 20, 3, 9, 17, 1, 40])]
    rows = pack_sequences(texts, tok, 16, seed=0, align=8)
    x, y = split_rows(torch.from_numpy(rows), pad_fill(tok))
    padded = torch.from_numpy(rows == PAD)
    assert padded.any()
    assert (x[padded[:, :-1]] == (2 if pad is None else pad)).all() and (x >= 0).all()
    assert ((y == -100) == padded[:, 1:]).all()  # exactly the padding is ignored
    assert int((y == 2).sum()) == int((torch.from_numpy(rows[:, 1:]) == 2).sum()) > 0  # end tokens are targets


class _Refs:
    """ReferenceTokens stand-in: reference r is tokens [10+r, 11+r, …]."""

    def batch(self, refs, device):
        ids = torch.tensor([[10 + r + j for j in range(6)] for r in refs])
        return ids, torch.full((len(refs),), 6)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_the_reference_encoding(detach):
    from m3cli.config import preset
    from m3cli.model import Memory3Model

    torch.manual_seed(0)
    model = Memory3Model(preset("tiny").replace(reference_prefix_ids=(1, 2), tie_embeddings=False))
    seq = 2 * model.config.chunk_length
    x = torch.randint(100, 200, (2, seq))  # the context never holds reference tokens 10..30
    chunk_refs = torch.tensor([[0, 3], [5, -1]])
    memory = continual_memory(model, chunk_refs, _Refs(), seq, detach)
    assert memory.kv.shape[:2] == (2, 2) and not memory.valid[1, 1].any()
    loss = model(x, memory=memory).logsumexp(-1).mean()
    loss.backward()
    ref_rows = model.embed.weight.grad[10:30].abs().sum()
    assert (ref_rows == 0) == detach  # only the memory encoding can reach these embeddings


def test_each_chunk_can_read_its_own_top_k_references():
    """--refs-per-chunk K --prev-chunks W: chunk c reads slots of chunks c-W..c, K slots each, in
    retrieval order; a missing reference (-1) is an empty slot."""
    from m3cli.config import preset
    from m3cli.model import Memory3Model

    torch.manual_seed(0)
    model = Memory3Model(preset("tiny").replace(reference_prefix_ids=(1, 2)))
    L = model.config.chunk_length
    refs = torch.tensor([[[0, 1, 2], [3, 4, -1], [5, 6, 7]]])  # one row, 3 chunks, top-3 each
    model.config = model.config.replace(train_prev_chunks=0)  # what --prev-chunks 0 sets
    memory = continual_memory(model, refs, _Refs(), 3 * L, detach=True)
    assert memory.kv.shape[:2] == (1, 9)
    assert memory.valid[0, 4].any() and not memory.valid[0, 5].any()
    vis = memory.visible[0]  # (T, slots)
    assert vis[0].tolist() == [True] * 3 + [False] * 6 and vis[L].tolist() == [False] * 3 + [True] * 3 + [False] * 3
    model.config = model.config.replace(train_prev_chunks=1)
    wide = continual_memory(model, refs, _Refs(), 3 * L, detach=True)
    assert wide.visible[0, 2 * L].tolist() == [False] * 3 + [True] * 6
    # the slots hold the references' own encodings, in the retrieved order
    ids, lengths = _Refs().batch([4], "cpu")
    alone = model.encode_references(ids, lengths)
    assert torch.allclose(memory.kv[0, 4], alone.kv[0])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    result = m3("synth", "-o", d / "s", "--people", "40", "--seed", "1")
    assert result.exit_code == 0, result.output
    return d / "s"


def test_synth_is_deterministic_and_keeps_unseen_facts_out_of_training(task, tmp_path):
    import pyarrow.parquet as pq

    again = tmp_path / "again"
    assert m3("synth", "-o", again, "--people", "40", "--seed", "1").exit_code == 0
    for name in ("train.parquet", "kb.parquet", "qa_seen.jsonl", "qa_unseen.jsonl"):
        assert (task / name).read_bytes() == (again / name).read_bytes(), name
    train = " ".join(pq.read_table(task / "train.parquet").column("text").to_pylist())
    kb = pq.read_table(task / "kb.parquet").to_pylist()
    unseen = {
        json.loads(x)["question"].split(" was ")[-1].split(" born")[0]
        for x in (task / "qa_unseen.jsonl").read_text().splitlines()
        if "Where was" in x
    }
    assert len(unseen) == 4 and not any(name in train for name in unseen)  # 10% of 40
    assert all(any(r["title"] == name for r in kb) for name in unseen) and len(kb) == 40
    assert len(read_qa(task / "qa_unseen.jsonl")) == 20 and len(read_qa(task / "qa_seen.jsonl")) == 180
    # every question names its person's knowledge-base document (eval's retrieval/reading diagnostics)
    titles = {r["title"] for r in kb}
    for q in read_qa(task / "qa_unseen.jsonl") + read_qa(task / "qa_seen.jsonl"):
        assert q["title"] in titles and q["title"] in q["question"]
    # every seen person has a biography and a question-only document
    ids = pq.read_table(task / "train.parquet").column("id").to_pylist()
    assert len(ids) == 72 and sum(i.endswith("#qa") for i in ids) == 36


def test_synth_namesake_pairs_add_training_text_only(task, tmp_path):
    """--namesake-pairs N appends N documents of one question-answer line about each of two
    seen people sharing a name; the other files are unchanged and unseen people stay out."""
    import pyarrow.parquet as pq

    pairs = tmp_path / "pairs"
    assert m3("synth", "-o", pairs, "--people", "40", "--seed", "1", "--namesake-pairs", "10").exit_code == 0
    for name in ("kb.parquet", "qa_seen.jsonl", "qa_unseen.jsonl"):
        assert (task / name).read_bytes() == (pairs / name).read_bytes(), name
    base, rows = pq.read_table(task / "train.parquet").to_pylist(), pq.read_table(pairs / "train.parquet").to_pylist()
    assert rows[: len(base)] == base and len(rows) == len(base) + 10
    seen = {
        json.loads(x)["question"]: json.loads(x)["answer"] for x in (task / "qa_seen.jsonl").read_text().splitlines()
    }
    for r in rows[len(base) :]:
        a, b = r["id"].split("#")[0].split("|")
        assert a != b and (a.split()[0] == b.split()[0] or a.split()[1] == b.split()[1])
        lines = [x for x in r["text"].split("Question: ")[1:]]
        assert len(lines) == 2 and a in lines[0] and b in lines[1]
        for line in lines:  # true facts of seen people
            q, ans = line.split(" Answer: ")
            assert seen[q] == ans.strip().rstrip(".")
    assert_user_error(
        m3("synth", "-o", tmp_path / "bad", "--people", "40", "--namesake-pairs", "-1"), "--namesake-pairs"
    )


def test_synth_qa_only_leaves_the_biographies_out(task, tmp_path):
    """--qa-only: train.parquet is the question documents of the full run, in the same order;
    no seen person's biography is in it; the other files are unchanged."""
    import pyarrow.parquet as pq

    out = tmp_path / "qa"
    assert m3("synth", "-o", out, "--people", "40", "--seed", "1", "--qa-only").exit_code == 0
    for name in ("kb.parquet", "qa_seen.jsonl", "qa_unseen.jsonl"):
        assert (task / name).read_bytes() == (out / name).read_bytes(), name
    full = pq.read_table(task / "train.parquet").to_pylist()
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert rows == [r for r in full if r["id"].endswith("#qa")] and len(rows) == 36
    assert all(r["text"].startswith("Question: ") for r in rows)
    assert json.loads((out / "synth.json").read_text())["qa_only"] is True


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_warmup_loss_falls_and_a_killed_run_resumes_to_the_same_weights(task, tmp_path):
    base = [
        "pretrain",
        task / "train.parquet",
        "--preset",
        "mini",
        "--stage",
        "warmup",
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--save-every",
        "4",
        "--log-every",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "4",
        "-q",
    ]
    result = m3(*base, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    losses = [json.loads(x)["loss"] for x in (tmp_path / "a.train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0
    # the same run, SIGKILLed after a checkpoint, then resumed
    kill_after_checkpoint(base, tmp_path / "b", step=8, timeout=120)
    result = m3(*base, "-o", tmp_path / "b", "--resume")
    assert result.exit_code == 0, result.output
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_continual_training_reads_retrieved_memories_and_eval_runs(task, tmp_path):
    warm = tmp_path / "warm"
    common = ["--batch-size", "4", "--seq-len", "128", "--log-every", "2", "-q"]
    assert (
        m3("pretrain", task / "train.parquet", "-o", warm, "--preset", "mini", "--steps", "4", *common).exit_code == 0
    )
    bank = tmp_path / "kb.m3bank"
    assert m3("encode", task / "kb.parquet", "-o", bank, "-m", warm, "-q").exit_code == 0
    model = tmp_path / "model"
    result = m3(
        "pretrain",
        task / "train.parquet",
        "-o",
        model,
        "--init-from",
        warm,
        "--stage",
        "continual",
        "--bank",
        bank,
        "--steps",
        "4",
        *common,
    )
    assert result.exit_code == 0, result.output
    assert "must be re-encoded" in result.stdout
    refs = np.load(tmp_path / "model.train" / "retrieval.npy")
    assert refs.shape[1] == 2 and (refs >= 0).mean() > 0.9
    metrics = [json.loads(x) for x in (tmp_path / "model.train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["continual", "continual"]
    # the old bank belongs to the warm model: eval with the new one refuses it, a re-encoded one works
    assert_user_error(m3("eval", "-m", model, "-b", bank, "--qa", task / "qa_unseen.jsonl"), "re-encode")
    bank2 = tmp_path / "kb2.m3bank"
    assert m3("encode", task / "kb.parquet", "-o", bank2, "-m", model, "-q").exit_code == 0
    result = m3(
        "eval",
        "-m",
        model,
        "-b",
        bank2,
        "--qa",
        task / "qa_unseen.jsonl",
        "--limit",
        "6",
        "--json",
        "--text",
        task / "kb.parquet",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"none", "memory", "rag"}
    for r in out.values():
        assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and r["chance"] > 0 and r["perplexity"] > 1
    assert len({r["perplexity_tokens"] for r in out.values()}) == 1  # the same tokens in every mode
    # the questions name their documents: memory mode says whether the answers had them in memory
    mem = out["memory"]
    assert 0 <= mem["right_first"] <= mem["right_retrieved"] <= 1
    assert mem["right_retrieved"] > 0 and 0 <= mem["right_attention"] <= 1 and 0 < mem["right_attention_even"] <= 1
    assert not {"right_retrieved", "right_attention"} & (set(out["none"]) | set(out["rag"]))
    # the same figures from m3 search: the question's own top-5 (eval's prompt is a single chunk)
    qa = read_qa(task / "qa_unseen.jsonl")[:6]
    found = first = 0
    for q in qa:
        hits = json.loads(
            m3(
                "search",
                bank2,
                f"Question: {q['question']} Answer:",
                "--memories",
                "5",
                "--max-overlap",
                "0.67",
                "--json",
            ).stdout
        )["results"]
        titles = [h["title"] for h in hits]
        found, first = found + (q["title"] in titles), first + (titles[:1] == [q["title"]])
    assert mem["right_retrieved"] == round(found / 6, 4) and mem["right_first"] == round(first / 6, 4)
    # without titles: no such fields
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in q.items() if k != "title"}) + "\n" for q in qa))
    result = m3("eval", "-m", model, "-b", bank2, "--qa", plain, "--modes", "memory", "--json")
    assert result.exit_code == 0 and "right_retrieved" not in json.loads(result.stdout)["memory"]


def test_memory_read_diagnostic_of_one_completion():
    """At the prompt's last token: right_attention is the share of memory attention on the
    question's document among all memories (several references of one document add up); the
    last prompt chunk counts; a document not retrieved gives no share."""
    from m3cli.evaluate import _memory_read
    from m3cli.generate import ChunkRecord, Completion
    from m3cli.retrieval import Hit

    def hit(title):
        return Hit(ref=0, score=1.0, doc_id=title, title=title, text="")

    hits = [hit("B"), hit("A"), hit("C"), hit("A")]
    early = ChunkRecord(0, "prompt", (0, 64), "q", [hit("Z")], attention=[0.5], last_attention=[0.5])
    last = ChunkRecord(
        1, "prompt", (64, 70), "q", hits, attention=[0.9, 0, 0, 0], last_attention=[0.1, 0.2, 0.05, 0.05]
    )
    decoded = ChunkRecord(2, "inherited", (0, 3), None, hits, attention=[0.9, 0.0, 0.0, 0.0])
    c = Completion("q", "x", [1, 2, 3], 70, "length", [early, last, decoded])
    retrieved, first, share, even = _memory_read(c, "A")
    assert retrieved and not first and abs(share - 0.25 / 0.4) < 1e-9 and even == 0.5
    assert _memory_read(c, "B")[:3] == (True, True, 0.25) and _memory_read(c, "Z") == (False, False, None, None)
    unmeasured = Completion("q", "", [], 70, "eos", [ChunkRecord(0, "prompt", (0, 9), "q", hits[1:])])
    assert _memory_read(unmeasured, "A") == (True, True, None, None)


def test_aligned_training_loss_ignores_exactly_the_padding(task, tmp_path, monkeypatch):
    """`m3 pretrain --align-docs`: the loss sees every end-of-document target and none of the padding."""
    import m3cli.train as train_module

    seen = []
    real = train_module.F.cross_entropy

    def spy(logits, targets, **kw):
        seen.append((targets.clone(), kw.get("ignore_index")))
        return real(logits, targets, **kw)

    monkeypatch.setattr(train_module.F, "cross_entropy", spy)
    out = tmp_path / "w"
    assert (
        m3(
            "pretrain",
            task / "train.parquet",
            "-o",
            out,
            "--preset",
            "mini",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "128",
            "--align-docs",
            "-q",
        ).exit_code
        == 0
    )
    eos = load_tokenizer(out).eos_token_id
    assert seen and all(ignore == -100 for _, ignore in seen)
    targets = torch.cat([t.flatten() for t, _ in seen])
    assert (targets == -100).any() and (targets == eos).any() and (targets >= -100).all()


def test_continual_training_reads_the_top_k_of_aligned_chunks(task, tmp_path):
    """The proof's settings: documents aligned to chunks, each chunk reading its own top-3,
    memory in every layer, top-k overridden."""
    warm = tmp_path / "warm"
    common = ["--batch-size", "2", "--seq-len", "128", "--log-every", "1", "--align-docs", "-q"]
    assert (
        m3("pretrain", task / "train.parquet", "-o", warm, "--preset", "mini", "--steps", "2", *common).exit_code == 0
    )
    bank = tmp_path / "kb.m3bank"
    assert m3("encode", task / "kb.parquet", "-o", bank, "-m", warm, "-q").exit_code == 0
    cont = [
        "pretrain",
        task / "train.parquet",
        "--init-from",
        warm,
        "--stage",
        "continual",
        "--bank",
        bank,
        "--steps",
        "3",
        "--prev-chunks",
        "0",
        "--memory-layers",
        "all",
        "--memory-top-k",
        "4",
        *common,
    ]
    assert m3(*cont, "-o", tmp_path / "k3", "--memories", "3").exit_code == 0
    refs = np.load(tmp_path / "k3.train" / "retrieval.npy")
    assert refs.shape[1:] == (2, 3) and (refs[:, :, 1] >= 0).mean() > 0.9
    cfg = json.loads((tmp_path / "k3" / "config.json").read_text())
    assert cfg["memory_layers"] == [0, 1, 2, 3] and cfg["memory_top_k"] == 4 and cfg["train_prev_chunks"] == 0
    assert m3(*cont, "-o", tmp_path / "b", "--memories", "1").exit_code == 0
    b, k3 = _weights(tmp_path / "b"), _weights(tmp_path / "k3")
    assert not all(torch.equal(b[n], k3[n]) for n in b)  # reading 3 trains differently from reading 1
    # --distractors title: rank 0 is the chunk's own top-1, ranks 1..2 what its title retrieves
    assert m3(*cont, "-o", tmp_path / "t", "--memories", "3", "--distractors", "title").exit_code == 0
    titled = np.load(tmp_path / "t.train" / "retrieval.npy")
    assert (titled[:, :, 0] == refs[:, :, 0]).all() and (titled[:, :, 1:] != refs[:, :, 1:]).any()
    from m3cli.bank import Bank
    from m3cli.retrieval import Retriever, query_embedder

    with Bank(bank) as b:
        retriever = Retriever(b, query_embedder(b))
        for first, rest in {(int(r[0]), tuple(r[1:])) for r in titled.reshape(-1, 3) if r[0] >= 0}:
            title = b.document(b.reference(first).doc_index).title
            near = [h.ref for h in retriever.search([title], k=3)[0] if h.ref != first][:2]
            assert list(rest) == near
    assert_user_error(m3(*cont, "-o", tmp_path / "c", "--distractors", "nearest"), "--distractors")
    assert_user_error(
        m3(
            "pretrain",
            task / "train.parquet",
            "-o",
            tmp_path / "c",
            "--init-from",
            warm,
            "--memory-score-prior",
            *common,
        ),
        "--stage continual",
    )
    assert_user_error(m3(*cont, "-o", tmp_path / "c", "--memory-layers", "0,9"), "layers 0..3")
    assert_user_error(m3(*cont, "-o", tmp_path / "c", "--memories", "0"), "--memories")
    # a bank indexed with an encoder dir (here a copy of MiniLM): the bank names it, --embedder
    # names it once it moved, and the retrievals are those of the same weights under the default name
    import shutil

    from m3cli.embed import minilm_dir

    enc = tmp_path / "encoder"
    shutil.copytree(minilm_dir(), enc)
    assert m3("index", bank, "--embedder", enc, "-q").exit_code == 0
    assert m3(*cont, "-o", tmp_path / "c", "--memories", "3").exit_code == 0
    assert (np.load(tmp_path / "c.train" / "retrieval.npy") == refs).all()
    shutil.move(enc, tmp_path / "moved")
    assert_user_error(m3(*cont, "-o", tmp_path / "d", "--memories", "3"), "pass its directory with --embedder")
    assert m3(*cont, "-o", tmp_path / "e", "--memories", "3", "--embedder", tmp_path / "moved").exit_code == 0
    assert (np.load(tmp_path / "e.train" / "retrieval.npy") == refs).all()


def test_score_gaps_compare_each_slot_with_its_chunks_best():
    from m3cli.train import score_gaps

    refs = np.array([[[4, 7, -1], [-1, -1, -1]], [[2, 3, 5], [9, -1, 1]]])
    scores = np.array([[[0.9, 0.7, 0.0], [0.0, 0.0, 0.0]], [[0.5, 0.6, 0.1], [0.3, 0.0, 0.8]]], dtype=np.float32)
    np.testing.assert_allclose(
        score_gaps(refs, scores), [[0.0, -0.2, 0.0, 0.0, 0.0, 0.0], [-0.1, 0.0, -0.5, -0.5, 0.0, 0.0]], atol=1e-6
    )


def test_continual_training_learns_the_retriever_score_prior(task, tmp_path):
    """--memory-score-prior: the model gets zero gains (reading unchanged), training retrieves each
    slot's score for its chunk's text (title distractors too) and moves the gains; the saved model
    carries them, and evaluation passes the retriever's scores to them."""
    from m3cli.bank import Bank
    from m3cli.checkpoint import load_model_dir, model_fingerprint
    from m3cli.retrieval import embeddings_of

    warm = tmp_path / "warm"
    common = ["--batch-size", "2", "--seq-len", "128", "--log-every", "1", "--align-docs", "-q"]
    assert (
        m3(
            "pretrain",
            task / "train.parquet",
            "-o",
            warm,
            "--preset",
            "mini",
            "--steps",
            "2",
            "--memory-layers",
            "all",
            *common,
        ).exit_code
        == 0
    )
    bank = tmp_path / "kb.m3bank"
    assert m3("encode", task / "kb.parquet", "-o", bank, "-m", warm, "-q").exit_code == 0
    cont = [
        "pretrain",
        task / "train.parquet",
        "--init-from",
        warm,
        "--stage",
        "continual",
        "--bank",
        bank,
        "--steps",
        "3",
        "--prev-chunks",
        "0",
        "--memories",
        "3",
        "--distractors",
        "title",
        *common,
    ]
    result = m3(*cont, "-o", tmp_path / "p", "--memory-score-prior", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert "added the retriever-score prior" in result.stderr
    refs = np.load(tmp_path / "p.train" / "retrieval.npy")
    scores = np.load(tmp_path / "p.train" / "retrieval-scores.npy")
    assert scores.shape == refs.shape and (scores[refs < 0] == 0).all()
    real = (refs >= 0).all(-1)
    assert real.mean() > 0.9  # the chunk's own top-1 is its best hit, its title's namesakes score lower
    assert (scores[real][:, 0] >= scores[real][:, 1:].max(-1) - 1e-5).all()
    assert (scores[real][:, 1:] < scores[real][:, :1] - 1e-3).any()
    with Bank(bank) as b:  # every score is an inner product with a stored reference embedding
        emb = embeddings_of(b)
    assert np.abs(scores[real]).max() <= np.linalg.norm(emb, axis=1).max() * 1.01
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["memory_score_prior"] is True
    gain = _weights(tmp_path / "p")["memory_score_gain"]
    assert gain.shape == (4, 4) and gain.abs().min() > 0  # mini: 4 memory layers here, 4 heads; all moved
    rows = [json.loads(x) for x in (tmp_path / "p.train" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("score_gain" in r for r in rows)
    assert rows[-1]["score_gain"] == pytest.approx(float(gain.mean()), abs=1e-4)
    # the prior is a config field the fingerprint covers only when on: the warm model keeps its identity
    assert model_fingerprint(warm) != model_fingerprint(tmp_path / "p")
    assert load_model_dir(warm).config.memory_score_prior is False
    # a second continual stage from the prior's model keeps its gains as its starting point
    kb2 = tmp_path / "kb2.m3bank"
    assert m3("encode", task / "kb.parquet", "-o", kb2, "-m", tmp_path / "p", "-q").exit_code == 0
    second = [
        "pretrain",
        task / "train.parquet",
        "--init-from",
        tmp_path / "p",
        "--stage",
        "continual",
        "--bank",
        kb2,
        "--steps",
        "1",
        "--prev-chunks",
        "0",
        "--memories",
        "3",
        *common,
    ]
    result = m3(*second, "-o", tmp_path / "p2")
    assert result.exit_code == 0, result.output
    assert "retriever-score prior" not in result.stderr
    # its gains are per memory layer: the layers cannot change under it
    assert_user_error(m3(*second, "-o", tmp_path / "p3", "--memory-layers", "0,1"), "--memory-layers")
    # a run with the prior does not resume one without it
    plain = TrainArgs(stage="continual", corpus="x", output="y", init_from="m", bank="b")
    assert (
        plain.key()
        != TrainArgs(stage="continual", corpus="x", output="y", init_from="m", bank="b", score_prior=True).key()
    )
    assert (tmp_path / "p2.train" / "retrieval-scores.npy").is_file()
    result = m3(
        "eval",
        "--model",
        tmp_path / "p",
        "--bank",
        kb2,
        "--qa",
        task / "qa_unseen.jsonl",
        "--limit",
        "3",
        "--modes",
        "memory",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory"]["n"] == 3 and json.loads(result.stdout)["memory"]["score_prior"] is True
    # --no-score-prior hides the scores from the prior
    result = m3(
        "eval",
        "--model",
        tmp_path / "p",
        "--bank",
        kb2,
        "--qa",
        task / "qa_unseen.jsonl",
        "--limit",
        "3",
        "--modes",
        "memory",
        "--json",
        "--no-score-prior",
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["memory"]["score_prior"] is False


def test_first_sentence_scoring():
    assert first_sentence(" Port Adler. Question: Where") == "Port Adler"
    assert first_sentence("\n\nLima is the capital.\nMore") == "Lima is the capital"  # an answer on a new line
    assert is_correct("Lima", "\nLima.") and not is_correct("Lima", "\nPeru.\nLima")
    assert is_correct("Port Adler", " port adler.")
    assert not is_correct("Windham", " Port Adler. Question: Where was Yara born? Answer: Windham.")
    assert is_correct("Kessel", " the University of Kessel") and not is_correct("Kessel", " Kesselton")
    # a '.' inside a token does not end the sentence: internet domains, decimals
    assert (
        first_sentence("The internet domain of Algeria is .dz. Its capital") == "The internet domain of Algeria is .dz"
    )
    assert is_correct(".dz", "The internet domain of Algeria is .dz.") and not is_correct(".dz", "It is DZD.")
    assert is_correct("3.5", " About 3.5 million.") and not is_correct(".dz", " Algeria. Its domain is .dz")
    # aliases: other accepted answers, the same whole-word rule
    assert is_correct("Singaporean", " They are called Singaporeans.", ["Singaporeans"])
    assert not is_correct("Singaporean", " They are called Singaporeans.")
    assert not is_correct("Afghan", " Afghanistani.", ["Afghans"])


def test_pretrain_and_eval_errors(task, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(m3("pretrain", empty, "-o", tmp_path / "m", "--preset", "mini"), "holds no text")
    assert_user_error(
        m3("pretrain", task / "train.parquet", "-o", tmp_path / "m", "--preset", "huge"), "unknown preset"
    )
    assert_user_error(
        m3("pretrain", task / "train.parquet", "-o", tmp_path / "m", "--preset", "mini", "--stage", "continual"),
        "needs --bank",
    )
    assert_user_error(m3("pretrain", task / "train.parquet", "-o", tmp_path / "m"), "--preset", "--init-from")
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert_user_error(m3("eval", "-m", tmp_path, "--qa", bad), "answer")
    bad.write_text('{"question": "x", "answer": "y", "aliases": "z"}\n')
    assert_user_error(m3("eval", "-m", tmp_path, "--qa", bad), "aliases")
    bad.write_text('{"question": "x", "answer": " "}\n')
    assert_user_error(m3("eval", "-m", tmp_path, "--qa", bad), "non-empty")
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "x", "answer": "y"}\n')
    assert_user_error(m3("eval", "-m", tmp_path, "--qa", good, "--batch-size", "0"), "--batch-size")
    assert_user_error(m3("eval", "-m", tmp_path, "--qa", good, "--prompt-template", "Q:"), "{question}")
    assert not (tmp_path / "m").exists()
