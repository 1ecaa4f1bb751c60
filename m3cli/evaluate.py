"""`m3 eval`: the same questions in every mode in one run (accuracy), and held-out perplexity.

A question counts as answered when its answer (case-insensitive) appears in the first sentence
of the greedy completion (or one of its "aliases"): the completion is cut at the first '.', '?'
or '!' that ends a sentence (followed by a space or the end) or newline, so a model that rambles
on into other facts gets no credit for them, while ".dz" or "3.5" stay whole.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import M3Error

DEFAULT_TEMPLATE = "Question: {question} Answer:"
_FIRST_SENTENCE = re.compile(r"[.?!](?=\s|$)|\n")


def read_qa(path: Path, limit: int | None = None) -> list[dict]:
    """{"question", "answer"} objects, one per line (extra fields kept; "aliases", when given,
    lists other accepted answers)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise M3Error(f"question file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise M3Error(f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise M3Error(f"{path} line {n}: invalid JSON ({e.msg})") from None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("question"), str)
            or not isinstance(obj.get("answer"), str)
            or not obj["answer"].strip()
        ):
            raise M3Error(f'{path} line {n}: needs string fields "question" and a non-empty "answer"')
        aliases = obj.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise M3Error(f'{path} line {n}: "aliases" must be a list of non-empty strings')
        out.append(obj)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise M3Error(f"{path} holds no questions")
    return out


def first_sentence(text: str) -> str:
    """Up to the first '.', '?' or '!' followed by a space or the end, or the first line break,
    after any leading blank lines (an instruct model may start its answer on a new line)."""
    text = text.lstrip()
    m = _FIRST_SENTENCE.search(text)
    return text if m is None else text[: m.start()]


def is_correct(answer: str, completion: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """The answer (or one of its aliases), as whole words, in the completion's first sentence
    (so "Kessel" does not match "Kesselton", though it still matches "University of Kessel")."""
    sentence = first_sentence(completion).lower()
    return any(re.search(r"(?<!\w)" + re.escape(a.strip().lower()) + r"(?!\w)", sentence) for a in (answer, *aliases))


def _memory_read(completion, title: str) -> tuple[bool, bool, float | None, float | None]:
    """For one memory-mode completion of a question about the document `title`, at the prompt's
    last token (the position that writes the answer's first token): was that document among the
    memories it read, was it the retriever's first, what share of the memory layers' attention
    to memories went to its memories (averaged over layers and heads; None when it was not
    retrieved or nothing was measured), and what share reading all memories alike would give."""
    prompt = [r for r in completion.chunks if r.source == "prompt"]
    if not prompt:
        return False, False, None, None
    rec = prompt[-1]
    right = [h.title == title for h in rec.hits]
    share = chance = None
    if any(right) and rec.last_attention is not None and sum(rec.last_attention) > 0:
        share = sum(a for a, r in zip(rec.last_attention, right) if r) / sum(rec.last_attention)
        chance = sum(right) / len(right)
    return any(right), bool(right and right[0]), share, chance


def evaluate(
    gen,
    qa: list[dict],
    modes: list[str],
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    max_overlap: float | None = 0.67,
    memories: int = 5,
    texts: list[str] | None = None,
    chat: bool | None = None,
    progress=None,
    max_gap: float | None = None,
    score_prior: bool = True,
) -> dict:
    """{mode: {"accuracy", "n", "correct", "chance", "perplexity"?}} plus per-question records
    under "_answers" (mode -> list of completions).

    When every question names the knowledge-base document it is about ("title"), memory mode
    also reports, at the prompt's last token (which writes the answer's first token), how memory
    was used: "right_retrieved" (the share of questions whose document was among the memories
    read there), "right_first" (it was the retriever's first), "right_attention" (over those
    questions, the mean share of the memory layers' attention to memories that went to that
    document's memories) and "right_attention_even" (the same share if every memory got as much
    attention as the others). They tell a retrieval failure from a reading failure.

    With a model that has the retriever-score prior, memory mode says whether it read the
    retriever's scores ("score_prior"; score_prior=False reads by content alone, as the paper)."""
    from .generate import Options

    if "{question}" not in template:
        raise M3Error("--prompt-template must contain {question}")
    prompts = [template.replace("{question}", q["question"]) for q in qa]
    limit = gen.cfg.context_length
    for j, t in enumerate(texts or []):  # fail before minutes of generation, not after
        n = len(gen.tokenizer(t)["input_ids"])
        if n > limit:
            raise M3Error(f"held-out text {j + 1} has {n} tokens, more than the model's context of {limit}")
    chance = [q.get("chance") for q in qa]
    titles = [q.get("title") for q in qa]
    has_titles = all(isinstance(t, str) and t.strip() for t in titles)
    result: dict = {"_answers": {}}
    for mode in modes:
        diagnose = mode == "memory" and has_titles
        opts = Options(
            mode=mode,
            max_new_tokens=max_new_tokens,
            memories=memories,
            max_overlap=max_overlap,
            chat=chat,
            cite=diagnose,
            max_gap=max_gap,
            score_prior=score_prior,
        )
        opts.check()
        completions, reads = [], []
        for start in range(0, len(prompts), batch_size):
            batch = gen.generate(prompts[start : start + batch_size], opts)
            completions += [c.text for c in batch]
            if diagnose:
                reads += [_memory_read(c, t) for c, t in zip(batch, titles[start : start + batch_size])]
            if progress is not None:
                progress(mode, len(completions), len(prompts))
        correct = sum(is_correct(q["answer"], c, q.get("aliases", ())) for q, c in zip(qa, completions))
        entry = {"accuracy": round(correct / len(qa), 4), "n": len(qa), "correct": correct}
        if mode == "memory" and gen.cfg.memory_score_prior:
            entry["score_prior"] = score_prior
        if all(isinstance(c, (int, float)) for c in chance):
            entry["chance"] = round(sum(chance) / len(chance), 4)
        if diagnose:
            measured = [(s, c) for _, _, s, c in reads if s is not None]
            entry["right_retrieved"] = round(sum(r[0] for r in reads) / len(reads), 4)
            entry["right_first"] = round(sum(r[1] for r in reads) / len(reads), 4)
            entry["right_attention"] = round(sum(s for s, _ in measured) / len(measured), 4) if measured else None
            entry["right_attention_even"] = round(sum(c for _, c in measured) / len(measured), 4) if measured else None
        if texts:
            nll, count = 0.0, 0
            for t in texts:
                r = gen.score(
                    t,
                    Options(
                        mode=mode, memories=memories, max_overlap=max_overlap, max_gap=max_gap, score_prior=score_prior
                    ),
                )
                nll -= sum(r["logprobs"])
                count += len(r["logprobs"])
            entry["perplexity"] = round(math.exp(nll / count), 4)
            entry["perplexity_tokens"] = count
        result[mode] = entry
        result["_answers"][mode] = completions
    return result
