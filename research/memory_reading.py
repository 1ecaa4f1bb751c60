"""Does a model tell its memories apart? Experiments behind README § Training (issue #6).

  rows   teacher-forced accuracy of each answer's first token ("Answer: X.") on a continual
         run's training rows, with the memories each chunk reads swapped: none, that run's
         cached retrievals (its state dir's retrieval.npy), only their top-1, the top-1 plus
         random references, the top-5 of the chunk's first question alone (as eval retrieves). If the top-1 alone is read well and the
         top-1 plus distractors is not, the model does not pick the right memory.
  train  a continual stage (`m3 pretrain --stage continual`) with variants that are not CLI
         options: each chunk's top-1 plus random references (`--random K`), and references
         whose document-title tokens are left out of the training memories (`--mask-titles`),
         and the memory-match loss on chosen layers only (`--match-layers`), and a name loss
         (`--name-loss W --name-layers 1 --name-sides ctx,ref`, `install_name_loss`) that makes
         the residual after those layers predict whom the text is about.
         It reuses the chunk retrievals of an earlier run on the same corpus, seed and length
         (`--retrievals`), so it starts in seconds. The random references are drawn once per
         chunk (seed 123), so a row reads the same ones in every epoch.
  probe  is the asked person's identity in the queries and the memory keys at all? Per memory
         layer and query head, a bilinear score q·W·k (logsumexp over a memory's kept tokens)
         is trained to pick the asked person's memory among a question's top-5 (questions that
         name their document, `title`), and compared with the model's own W = I, on held-out
         questions. Queries are taken at the prompt's last token in a pass without memory.
  names  does the answer token know whom the question names? Per layer, linear probes on the
         residual stream at the prompt's last token ("… Answer:", no memory) predict the asked
         person's first and last name (fitted on one set of questions, scored on another's
         people). A memory layer's queries come from the residual entering it.
  score-prior  an emulation, without training: every memory slot's attention logits get
         beta * (its retriever score - the chunk's top score) in every layer, and the
         questions are answered with 5 memories (`m3 eval`'s memory mode). What would steering
         the reading by the retriever's confidence give this model? (The paper reads memories
         by content alone: beta 0.) For models without the learned prior of
         `m3 pretrain --memory-score-prior`, such as x8 (samples/model at commit 1659e0f).
  (rows, probe and names build memories without retriever scores: on a model with the
  learned prior they measure its content-only reading.)

    python research/memory_reading.py rows --model out/exp/s3c --corpus out/exp/synth-c/train-qa.parquet \\
        --bank out/exp/kb-c-s3c.m3bank --retrievals out/exp/s3c.train/retrieval.npy
    python research/memory_reading.py probe --model out/proof/model --bank out/proof/kb.m3bank \
        --train-qa out/proof/synth/qa_seen.jsonl --test-qa out/proof/qa_unseen.jsonl
    python research/memory_reading.py names --model samples/model --train-qa out/demo/synth/qa_seen.jsonl \
        --test-qa out/demo/synth/qa_unseen.jsonl
    python research/memory_reading.py score-prior --model out/proof/model --bank out/proof/kb.m3bank \
        --qa out/proof/qa_unseen.jsonl --limit 500 --betas 0,20,30,50,100,1000
    python research/memory_reading.py train -o out/exp/s6 --init-from out/exp/s3c --corpus out/exp/synth-c/train-qa.parquet \\
        --bank out/exp/kb-c-s3c.m3bank --retrievals out/exp/s3c.train/retrieval.npy --random 5 --steps 800 --seed 1
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import math  # noqa: E402

import m3cli.bank as bank_module  # noqa: E402
import m3cli.train as train_module  # noqa: E402
from m3cli.bank import Bank  # noqa: E402
from m3cli.checkpoint import load_model_dir, load_tokenizer  # noqa: E402
from m3cli.corpus import read_corpus  # noqa: E402
from m3cli.retrieval import Retriever, query_embedder  # noqa: E402

CHUNK = 64


def with_random(refs: np.ndarray, n_refs: int, k: int, seed: int) -> np.ndarray:
    """Each chunk's top-1 (column 0) plus k-1 references drawn uniformly (never the top-1)."""
    out = np.full(refs.shape[:2] + (k,), -1, dtype=np.int64)
    out[:, :, 0] = refs[:, :, 0]
    r = np.random.default_rng(seed).integers(0, n_refs, size=out[:, :, 1:].shape)
    out[:, :, 1:] = np.where(r == out[:, :, :1], (r + 1) % n_refs, r)
    out[out[:, :, 0] < 0] = -1
    return out


def title_masks(ref_tokens, tokenizer) -> list[np.ndarray]:
    """Per reference: which of its tokens overlap a word of its document's title."""
    masks = []
    for ids, title in zip(ref_tokens.ids, ref_tokens.titles):
        parts = [tokenizer.decode([t]) for t in ids]
        lens = np.array([len(p) for p in parts])
        ends = np.cumsum(lens)
        starts = ends - lens
        text = "".join(parts)
        m = np.zeros(len(ids), bool)
        for word in title.split():
            for x in re.finditer(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text):
                m |= (starts < x.end()) & (ends > x.start())
        masks.append(m)
    return masks


def encoded_order(chunk_refs) -> tuple[list[int], list[int]]:
    """A batch's references slot by slot, and the order `continual_memory` encodes them in."""
    flat = (chunk_refs if chunk_refs.dim() == 3 else chunk_refs[:, :, None]).flatten().tolist()
    return flat, sorted({r for r in flat if r >= 0})


def masked_memory(tokenizer):
    """`continual_memory` with each reference's title tokens marked invalid (never read)."""
    from m3cli.attention import Memory

    def continual_memory(model, chunk_refs, ref_tokens, seq_len, detach):
        encode, seen = model.encode_references, {}

        def spy(*args, **kwargs):  # keep the kept tokens' positions of the one encoding inside
            enc = encode(*args, **kwargs)
            seen["positions"] = enc.positions
            return enc

        model.encode_references = spy
        try:
            mem = original_memory(model, chunk_refs, ref_tokens, seq_len, detach)
        finally:
            del model.encode_references  # the class's method again
        if mem is None:
            return None
        if not hasattr(ref_tokens, "title_masks"):
            ref_tokens.title_masks = title_masks(ref_tokens, tokenizer)
        flat, unique = encoded_order(chunk_refs)
        positions = seen["positions"].detach()  # (R, L, Hkv, k)
        p = len(model.config.reference_prefix_ids)
        where = {r: j for j, r in enumerate(unique)}
        positions = positions.cpu()
        is_title = torch.zeros((len(flat),) + positions.shape[1:], dtype=torch.bool)
        for s, r in enumerate(flat):
            if r < 0:
                continue
            pos = positions[where[r]] - p
            m = torch.from_numpy(ref_tokens.title_masks[r])
            is_title[s] = (pos >= 0) & m[pos.clamp(0, len(m) - 1)]
        valid = mem.valid & ~is_title.view(mem.valid.shape).to(mem.valid.device)
        return Memory(kv=mem.kv, valid=valid, sink=mem.sink, visible=mem.visible)

    return continual_memory


original_memory = train_module.continual_memory


def rows_cmd(a) -> None:
    tok = load_tokenizer(a.model)
    model = load_model_dir(a.model, "cpu", torch.float32).eval()
    texts = [d.text for d in read_corpus(a.corpus) if d.text.strip()]
    key = retrievals_key(a)
    aligned = key.get("align_docs", True) if key else True
    rows = train_module.pack_sequences(texts, tok, a.seq_len, a.seed, align=CHUNK if aligned else None)
    refs = load_retrievals(a, rows.shape[0], key)
    pick = np.random.default_rng(0).choice(rows.shape[0], min(a.rows, rows.shape[0]), replace=False)
    rows, refs = rows[pick], refs[pick]
    T = a.seq_len
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, train_module.PAD}
    first = np.zeros((len(rows), T), bool)  # target positions of each answer's first token
    for i, row in enumerate(rows):
        parts = ["\n" if t in special else tok.decode([t]) for t in row]
        starts = np.cumsum([0] + [len(p) for p in parts])[:-1]
        for m in re.finditer(r"Answer: ?([^\n]*?)\.(?= |\n|$)", "".join(parts)):
            idx = [j for j in range(len(row)) if starts[j] + len(parts[j]) > m.start(1) and starts[j] < m.end(1)
                   and parts[j].strip()]
            if idx and idx[0] >= 1:
                first[i, idx[0] - 1] = True
    ref_tokens = train_module.ReferenceTokens(Path(a.bank), tok, model.config.reference_length)
    memory_fn = masked_memory(tok) if a.mask_titles else original_memory
    with Bank(Path(a.bank)) as bank:
        n_refs = bank.n_refs
        retriever = Retriever(bank, query_embedder(bank, model_dir=a.model, device="cpu"))
        question = np.full(refs.shape[:2] + (5,), -1, dtype=np.int64)
        queries, where = [], []
        for r in range(len(rows)):
            for c in range(T // CHUNK):
                text = tok.decode([t for t in rows[r, c * CHUNK:(c + 1) * CHUNK].tolist() if t != train_module.PAD],
                                  skip_special_tokens=True)
                m = re.search(r"Question: [^?]*\?", text)
                if m:
                    queries.append(m.group(0))
                    where.append((r, c))
        for (r, c), hits in zip(where, retriever.search(queries, k=5, max_overlap=0.67)):
            question[r, c, :len(hits)] = [h.ref for h in hits]

    def accuracy(chunk_refs) -> float:
        right = 0
        with torch.no_grad():
            for s in range(0, len(rows), 8):
                x, y = train_module.split_rows(torch.from_numpy(rows[s:s + 8]), train_module.pad_fill(tok))
                mem = None if chunk_refs is None else memory_fn(model, torch.from_numpy(chunk_refs[s:s + 8]),
                                                                ref_tokens, T, True)
                right += int(((model(x, memory=mem).argmax(-1) == y).numpy() & first[s:s + 8]).sum())
        return round(right / int(first.sum()), 3)

    k = refs.shape[2]
    out = {"model": str(a.model), "answers": int(first.sum()), "none": accuracy(None),
           "top-1": accuracy(refs[:, :, :1]), f"cached top-{k}": accuracy(refs),
           "top-1 + 1 random": accuracy(with_random(refs, n_refs, 2, 5)),
           "top-1 + 4 random": accuracy(with_random(refs, n_refs, 5, 5)),
           "first question's top-5": accuracy(question)}
    print(json.dumps(out))


def retrievals_key(a) -> dict | None:
    """The settings of the run whose retrieval.npy this is (its retrieval.json), if kept."""
    info = Path(a.retrievals).with_name("retrieval.json")
    return json.loads(info.read_text())["key"] if info.is_file() else None


def load_retrievals(a, n_rows: int, key: dict | None) -> np.ndarray:
    """The cached chunk retrievals, checked against this corpus, seed and length."""
    refs = np.load(a.retrievals, allow_pickle=False)
    if key is not None:
        if (Path(key["corpus"]).name, key["seed"], key["seq_len"]) != (Path(a.corpus).name, a.seed, a.seq_len):
            raise SystemExit(f"{a.retrievals} belongs to {key['corpus']} (seed {key['seed']}, length "
                             f"{key['seq_len']}), not to {a.corpus} (seed {a.seed}, length {a.seq_len})")
    if refs.shape[0] != n_rows:
        raise SystemExit(f"{a.retrievals} holds {refs.shape[0]} rows, the corpus packs into {n_rows}")
    return refs


def install_name_loss(a) -> None:
    """`--name-loss W`: an auxiliary loss that makes the residual stream after the listed layers
    (`--name-layers`) name whom the text is about. A token whose document last mentioned a
    retrieved reference's title (the memory-match loss's target), and a reference token at or
    after its own title, should predict that title's tokens (uniformly) through a probe per layer
    (a linear map, then the model's embedding of the titles' tokens, detached, as the readout; the
    probes have their own Adam and are thrown away). It steers both sides of the memory match: the queries of
    the question's answer token and the keys of the facts' tokens in the references."""
    layers = [int(x) for x in a.name_layers.split(",")]
    captured: dict[int, list] = {i: [] for i in layers}
    state: dict = {}

    def hook(i):
        def fn(_module, _inputs, output):
            if torch.is_grad_enabled():
                captured[i].append(output)
        return fn

    encode_memory = train_module.continual_memory

    def continual_memory(model, chunk_refs, ref_tokens, seq_len, detach):
        if "model" not in state:  # first call: hooks, probes, title tokens
            state["model"], state["ref_tokens"] = model, ref_tokens
            for i in layers:
                model.layers[i].register_forward_hook(hook(i))
            d = model.config.hidden_size
            state["probes"] = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in layers).to(model.embed.weight.device)
            state["opt"] = torch.optim.Adam(state["probes"].parameters(), lr=a.lr)
            tok = load_tokenizer(a.init_from)
            from m3cli.corpus import reference_ids
            titles = {}
            for r, t in enumerate(ref_tokens.titles):
                titles.setdefault(int(ref_tokens.docs[r]), reference_ids(tok, t))
            m = max(len(v) for v in titles.values())
            table = torch.full((int(ref_tokens.docs.max()) + 2, m), -1, dtype=torch.long)
            for doc, ids in titles.items():
                table[doc, :len(ids)] = torch.tensor(ids)
            vocab = torch.unique(table[table >= 0])  # the readout: the tokens of any title
            index = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
            index[vocab] = torch.arange(len(vocab))
            state["vocab"] = vocab.to(model.embed.weight.device)
            state["doc_titles"] = torch.where(table >= 0, index[table.clamp(min=0)], -1)  # as readout indices
            masks = title_masks(ref_tokens, tok)
            state["after_title"] = [int(np.flatnonzero(mk)[-1]) if mk.any() else -1 for mk in masks]
            state["log"] = open(Path(a.output).with_name(Path(a.output).name + ".names.jsonl"), "w")
            state["n"], state["sum"] = 0, {}
        for i in layers:
            captured[i].clear()
        state["unique"] = encoded_order(chunk_refs)[1]
        return encode_memory(model, chunk_refs, ref_tokens, seq_len, detach)

    def probe_loss(h, want, j):  # h (N, D), want (N, m) title token ids, -1 padding
        emb = state["model"].embed.weight.detach()[state["vocab"]]
        z = state["probes"][j](h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5))
        logp = torch.log_softmax(z @ emb.float().T, dim=-1)
        ok = want >= 0
        picked = logp.gather(-1, want.clamp(min=0)) * ok
        return -(picked.sum(-1) / ok.sum(-1)).mean()

    match_loss = train_module.memory_match_loss

    def combined(scores, targets, slot_refs, visible, **kw):
        opt = state["opt"]
        opt.step()  # the probes' gradients of the previous step
        opt.zero_grad(set_to_none=True)
        match = match_loss(scores, targets, slot_refs, visible, **kw) if a.memory_match_loss > 0 else None
        total = None if match is None else a.memory_match_loss * match
        table = state["doc_titles"].to(targets.device)
        p = len(state["model"].config.reference_prefix_ids)
        unique = state["unique"]
        for j, i in enumerate(layers):
            losses = {}
            for out in captured[i]:
                if out.shape[:2] == targets.shape:  # the context
                    if "ctx" not in a.name_sides:
                        continue
                    has = targets >= 0
                    if bool(has.any()):
                        losses["ctx"] = probe_loss(out[has], table[targets[has]], j)
                elif "ref" in a.name_sides and out.shape[0] == len(unique) and out.shape[0] > 1:  # the references
                    want = torch.full(out.shape[:2], -1, dtype=torch.long, device=out.device)
                    for row, r in enumerate(unique):  # from the title's last token to the reference's end
                        if state["after_title"][r] >= 0:
                            want[row, p + state["after_title"][r]:p + len(state["ref_tokens"].ids[r])] = \
                                int(state["ref_tokens"].docs[r])
                    has = want >= 0
                    if bool(has.any()):
                        losses["ref"] = probe_loss(out[has], table[want[has]], j)
            captured[i].clear()
            for side, v in losses.items():
                total = a.name_loss * v if total is None else total + a.name_loss * v
                key = f"L{i}_{side}"
                state["sum"][key] = state["sum"].get(key, 0.0) + float(v.detach())
        state["n"] += 1
        if state["n"] % 20 == 0:
            state["log"].write(json.dumps({"step": state["n"], **{k: round(v / 20, 4) for k, v in state["sum"].items()}}) + "\n")
            state["log"].flush()
            state["sum"] = {}
        return total

    train_module.continual_memory = continual_memory
    train_module.memory_match_loss = combined


def train_cmd(a) -> None:
    if Path(a.output).with_name(Path(a.output).name + ".train").exists() and not a.force:
        raise SystemExit(f"{a.output}.train exists (its cached retrievals would be reused); pass --force")
    state = Path(a.output).with_name(Path(a.output).name + ".train")
    for name in ("retrieval.npy", "retrieval.json"):  # this script's variants are not in their key
        (state / name).unlink(missing_ok=True)

    def retrieve_for_chunks(rows, *args, **kwargs):
        if kwargs.get("with_scores"):
            raise SystemExit("this script's train runs have no retriever scores for the retriever-score prior; "
                             "start from a model without it (e.g. x8: samples/model at commit 1659e0f)")
        cached = load_retrievals(a, rows.shape[0], retrievals_key(a))
        if a.random:
            with Bank(Path(a.bank)) as bank:
                return with_random(cached, bank.n_refs, a.random, 123)
        return cached[:, :, :a.refs_per_chunk]

    train_module.retrieve_for_chunks = retrieve_for_chunks
    bank_module.require_same_model = lambda *args, **kwargs: None  # the bank serves only its text here
    if a.mask_titles:
        train_module.continual_memory = masked_memory(load_tokenizer(a.init_from))
    if a.match_layers:  # the memory-match loss on these memory layers only (the others read freely)
        keep = {int(x) for x in a.match_layers.split(",")}
        original_loss = train_module.memory_match_loss
        train_module.memory_match_loss = lambda scores, *rest, **kw: original_loss(
            [(layer, sc) for layer, sc in scores if layer in keep], *rest, **{**kw, "skip_layer0": False})
    if a.name_loss > 0:
        install_name_loss(a)
    k = a.random or a.refs_per_chunk
    args = train_module.TrainArgs(
        stage="continual", corpus=a.corpus, output=Path(a.output), init_from=Path(a.init_from), bank=Path(a.bank),
        steps=a.steps, batch_size=8, seq_len=a.seq_len, lr=a.lr, seed=a.seed, refs_per_chunk=k, prev_chunks=0,
        distractors="retrieved", align_docs=(retrievals_key(a) or {}).get("align_docs", True),
        memory_match_loss=a.memory_match_loss if a.name_loss <= 0 else 1.0)  # 1: `combined` weighs its parts
    print(train_module.pretrain(args, force=a.force, show_progress=False))


def probe_cmd(a) -> None:
    from m3cli.model import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    model = load_model_dir(a.model, "cpu", torch.float32).eval()
    cfg = model.config
    ref_tokens = train_module.ReferenceTokens(Path(a.bank), tok, cfg.reference_length)

    def features(path: str, n: int, every: int):
        qa = [json.loads(line) for line in open(path) if line.strip()][::every][:n]
        prompts = [f"Question: {q['question']} Answer:" for q in qa]
        with Bank(Path(a.bank)) as bank:
            hits = Retriever(bank, query_embedder(bank, model_dir=a.model, device="cpu")).search(
                prompts, k=5, max_overlap=0.67)
        qs, ks, valid, target = [], [], [], []
        for q, prompt, h in zip(qa, prompts, hits):
            right = [x.title == q["title"] for x in h]
            if len(h) < 5 or not any(right):
                continue
            ids = torch.tensor([tok(prompt)["input_ids"]])
            T = ids.shape[1]
            pos = torch.arange(T) + cfg.context_offset
            with torch.no_grad():
                caps = model._run_captured(ids, pos, torch.ones(T, T, dtype=torch.bool).tril()[None, None],
                                           cfg.mem_layers)
                cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
                qs.append(torch.stack([apply_rope(c["q"], cos, sin)[0, :, -1] for c in caps]))  # (L, H, D)
                enc = model.encode_references(*ref_tokens.batch([x.ref for x in h], "cpu"))
            ks.append(enc.kv[:, :, 0])  # (5, L, Hkv, k, D)
            valid.append(enc.valid)
            target.append(right.index(True))
        return torch.stack(qs), torch.stack(ks), torch.stack(valid), torch.tensor(target)

    train = features(a.train_qa, a.train_n, 4)
    test = features(a.test_qa, a.test_n, 1)
    L, H, D = train[0].shape[1:]
    group = H // cfg.n_kv_heads

    def scores(qs, ks, valid, W, layer, head):  # (N, 5): logsumexp over each memory's kept tokens
        s = torch.einsum("nd,nmkd->nmk", qs[:, layer, head] @ W, ks[:, :, layer, head // group]) / math.sqrt(D)
        return s.masked_fill(~valid[:, :, layer, head // group], -1e9).logsumexp(-1)

    def accuracy(data, W, layer, head) -> float:
        with torch.no_grad():
            return round(float((scores(*data[:3], W, layer, head).argmax(-1) == data[3]).float().mean()), 3)

    heads = {}
    for layer in range(L):
        for head in range(H):
            W = torch.eye(D).requires_grad_(True)
            opt = torch.optim.Adam([W], lr=1e-2)
            for _ in range(a.steps):
                loss = torch.nn.functional.cross_entropy(scores(*train[:3], W, layer, head), train[3])
                opt.zero_grad()
                loss.backward()
                opt.step()
            heads[f"layer {cfg.mem_layers[layer]} head {head}"] = {
                "own": accuracy(test, torch.eye(D), layer, head), "trained_fit": accuracy(train, W, layer, head),
                "trained_held_out": accuracy(test, W, layer, head)}
    print(json.dumps({"model": str(a.model), "train_questions": len(train[3]), "test_questions": len(test[3]),
                      "right_is_first": round(float((test[3] == 0).float().mean()), 3), "heads": heads}))


def names_cmd(a) -> None:
    torch.manual_seed(0)
    tok = load_tokenizer(a.model)
    model = load_model_dir(a.model, "cpu", torch.float32).eval()
    n_layers = model.config.n_layers

    def read(path: str, n: int) -> list[dict]:
        return [q for q in (json.loads(line) for line in open(path) if line.strip()) if q.get("title")][:n]

    train, test = read(a.train_qa, a.train_n), read(a.test_qa, a.test_n)
    if not train or not test or any(len(q["title"].split()) != 2 for q in train + test):
        raise SystemExit("names needs questions whose title is a first and a last name (m3 synth's)")
    vocab = [sorted({q["title"].split()[i] for q in train + test}) for i in (0, 1)]

    @torch.no_grad()
    def features(qa: list[dict]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda _m, _i, o, i=i: out.__setitem__(i, o))
                 for i, layer in enumerate(model.layers)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
        try:
            for q in qa:
                ids = torch.tensor([[int(i) for i in tok(f"Question: {q['question']} Answer:")["input_ids"]]])
                rows[0].append(model.embed(ids)[0, -1])
                model(ids)
                for i in range(n_layers):
                    rows[i + 1].append(out[i][0, -1])
        finally:
            for h in hooks:
                h.remove()
        return [torch.stack(r) for r in rows]

    def fit(x, y, xt, yt, n_classes: int) -> float:
        mu, sd = x.mean(0), x.std(0) + 1e-5
        x, xt = (x - mu) / sd, (xt - mu) / sd
        w = torch.nn.Linear(x.shape[1], n_classes)
        opt = torch.optim.Adam(w.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(a.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(w(x), y).backward()
            opt.step()
        with torch.no_grad():
            return float((w(xt).argmax(-1) == yt).float().mean())

    xs, xts = features(train), features(test)
    labels = [[torch.tensor([vocab[i].index(q["title"].split()[i]) for q in qa]) for i in (0, 1)] for qa in (train, test)]
    for layer in range(n_layers + 1):
        first = fit(xs[layer], labels[0][0], xts[layer], labels[1][0], len(vocab[0]))
        last = fit(xs[layer], labels[0][1], xts[layer], labels[1][1], len(vocab[1]))
        print(json.dumps({"residual": "embedding" if layer == 0 else f"after layer {layer - 1}",
                          "first_name": round(first, 3), "last_name": round(last, 3),
                          "first_names": len(vocab[0]), "last_names": len(vocab[1]),
                          "train": len(train), "test": len(test)}), flush=True)


def score_prior_cmd(a) -> None:
    import m3cli.model as model_module
    from m3cli.cli import _open_generator
    from m3cli.evaluate import evaluate, read_qa

    qa = read_qa(Path(a.qa), a.limit)
    state: dict = {"bias": None, "beta": 0.0}

    def biased(q, k, v, mask):  # attention_reference plus the per-slot bias on the memory keys
        B, H, T, D = q.shape
        group = H // k.shape[1]
        s = q.float() @ k.repeat_interleave(group, dim=1).float().transpose(-1, -2) / math.sqrt(D)
        bias = state["bias"]
        if bias is not None and bias.shape[0] == B and s.shape[-1] >= state["p"] + bias.shape[1] * state["k"]:
            lo, hi = state["p"], state["p"] + bias.shape[1] * state["k"]
            s[..., lo:hi] += bias.repeat_interleave(state["k"], dim=1)[:, None, None, :]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(s, dim=-1)
        if mask is not None:
            probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
        return (probs @ v.repeat_interleave(group, dim=1).float()).to(q.dtype)

    saved = dict(model_module.ATTENTION_IMPLS)
    try:
        with _open_generator(Path(a.model), Path(a.bank), "cpu", "float32", None) as (gen, _):
            cfg = gen.model.config
            if len(cfg.mem_layers) != cfg.n_layers:
                raise SystemExit("score-prior assumes memory in every layer (the key layout of the others differs)")
            if cfg.memory_score_prior:
                raise SystemExit("this model has a learned retriever-score prior (m3 pretrain --memory-score-prior); "
                                 "compare with `m3 eval --no-score-prior` instead of emulating one")
            state["p"], state["k"] = len(cfg.reference_prefix_ids), cfg.memory_top_k
            for name in model_module.ATTENTION_IMPLS:
                model_module.ATTENTION_IMPLS[name] = biased
            retrieve = gen._retrieve

            def retrieve_with_bias(queries, opts):  # one chunk per prompt here: slots are its hits
                hits = retrieve(queries, opts)
                bias = torch.zeros(len(hits), opts.memories)
                for i, h in enumerate(hits):
                    for j, x in enumerate(h):
                        bias[i, j] = state["beta"] * (x.score - h[0].score)
                state["bias"] = bias
                return hits

            gen._retrieve = retrieve_with_bias
            for beta in [float(x) for x in a.betas.split(",")]:
                state["beta"] = beta
                m = evaluate(gen, qa, ["memory"], memories=5, batch_size=32)["memory"]
                print(json.dumps({"beta": beta, "accuracy": m["accuracy"], "n": m["n"]}), flush=True)
    finally:
        model_module.ATTENTION_IMPLS.clear()
        model_module.ATTENTION_IMPLS.update(saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("rows", "train"):
        s = sub.add_parser(name)
        s.add_argument("--corpus", required=True)
        s.add_argument("--bank", required=True, help="the references (its text and index); rows: for retrieval")
        s.add_argument("--retrievals", required=True, help="retrieval.npy of the run whose rows are used")
        s.add_argument("--seq-len", type=int, default=256)
        s.add_argument("--seed", type=int, default=1, help="the data seed of that run (the rows' packing)")
        s.add_argument("--mask-titles", action="store_true")
    r = sub.choices["rows"]
    r.add_argument("--model", required=True)
    r.add_argument("--rows", type=int, default=64)
    t = sub.choices["train"]
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--init-from", required=True)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--random", type=int, default=0, help="K memories per chunk: the top-1 plus K-1 random")
    t.add_argument("--refs-per-chunk", type=int, default=5, help="without --random: the cached top-K")
    t.add_argument("--memory-match-loss", type=float, default=0.0)
    t.add_argument("--match-layers", default="", help="comma-separated memory layers the match loss steers "
                   "(default: all but layer 0, as m3 pretrain)")
    t.add_argument("--name-loss", type=float, default=0.0, help="weight of the name loss (install_name_loss)")
    t.add_argument("--name-layers", default="0,1", help="layers whose output residual the name loss steers")
    t.add_argument("--name-sides", default="ctx,ref", help="ctx (the training text), ref (the references)")
    t.add_argument("--force", action="store_true")
    q = sub.add_parser("probe")
    q.add_argument("--bank", required=True, help="an indexed bank of the questions' documents")
    nm = sub.add_parser("names")
    for s, fit_help, test_help, n in ((q, "to fit W (every 4th is used)", "held-out questions with a title", (2000, 500)),
                                      (nm, "to fit the probes (m3 synth's qa_seen.jsonl)", "questions about other people (qa_unseen.jsonl)",
                                       (4000, 1000))):
        s.add_argument("--model", required=True)
        s.add_argument("--train-qa", required=True, help=f"questions with a title, {fit_help}")
        s.add_argument("--test-qa", required=True, help=test_help)
        s.add_argument("--train-n", type=int, default=n[0])
        s.add_argument("--test-n", type=int, default=n[1])
        s.add_argument("--steps", type=int, default=300)
    sp = sub.add_parser("score-prior")
    sp.add_argument("--model", required=True)
    sp.add_argument("--bank", required=True)
    sp.add_argument("--qa", required=True, help="questions of one prompt chunk each (m3 synth's)")
    sp.add_argument("--limit", type=int, default=None)
    sp.add_argument("--betas", default="0,20,30,50,100")
    a = p.parse_args()
    {"rows": rows_cmd, "train": train_cmd, "probe": probe_cmd, "names": names_cmd,
     "score-prior": score_prior_cmd}[a.cmd](a)


if __name__ == "__main__":
    main()
