"""Chat prompts and retrieval: which tokens of a templated prompt are the user's own, and the
retrieval query of each prompt chunk (the template's system prompt and role names never query)."""

from __future__ import annotations


def user_token_mask(tokenizer, prompt: str, text: str) -> list[bool] | None:
    """Which tokens of `text` (the prompt in the chat template) hold the user's text: memory
    mode's prompt chunks retrieve with those alone, not with the template's system prompt and
    role names, which would otherwise outweigh a short question. None where the user's text
    cannot be located in the template verbatim (chunks then retrieve with all their text)."""
    if not prompt:
        return None
    marker = "\u2063m3-user-text\u2063"  # where the template puts the content, whatever it repeats
    marked = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    start = marked.find(marker)
    if (
        start < 0
        or marked.count(marker) != 1
        or text[:start] != marked[:start]
        or text[start : start + len(prompt)] != prompt
    ):
        return None
    end = start + len(prompt)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets
        return None
    return [s < end and e > start for s, e in enc["offset_mapping"]]


def chat_queries(
    tokenizer, ids: list[int], users: list[bool], spans: list[tuple[int, int]], chunk_length: int
) -> list[str | None]:
    """Retrieval queries of a chat prompt's chunks: each chunk's user tokens; a chunk after the
    user's text with none of it (the template's closing tokens) uses the last chunk_length
    user tokens before it, so the answer still reads memories of the question; a chunk before
    it (system prompt only) gets None: no retrieval, no memories."""
    out: list[str | None] = []
    for s, e in spans:
        own = [t for t, u in zip(ids[s:e], users[s:e]) if u]
        if not own:
            before = [t for t, u in zip(ids[:s], users[:s]) if u][-chunk_length:]
            out.append(tokenizer.decode(before, skip_special_tokens=True) if before else None)
        else:
            out.append(tokenizer.decode(own, skip_special_tokens=True))
    return out
