"""Per-token log-probabilities and perplexity of a text under a model.

Takes a loaded model and tokenizer; knows nothing about files or the CLI.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import M3Error


@torch.no_grad()
def score_ids(model, ids: list[int]) -> list[float]:
    """logprobs[i] = log p(ids[i+1] | ids[:i+1]), computed in float32."""
    device = model.embed.weight.device
    x = torch.tensor([ids], device=device)
    logits = model(x).float()[0, :-1]  # (T-1, V)
    target = x[0, 1:]
    return F.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].tolist()


def score_text(model, tokenizer, text: str) -> dict:
    """{"token_ids", "logprobs", "perplexity"} of `text` as the tokenizer encodes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise M3Error("the text is not valid UTF-8") from None
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if len(ids) < 2:
        raise M3Error("the text has fewer than 2 tokens: nothing to score")
    limit = model.config.context_length
    if len(ids) > limit:
        raise M3Error(f"the text has {len(ids)} tokens, more than the model's context of {limit}")
    logprobs = score_ids(model, ids)
    perplexity = math.exp(-sum(logprobs) / len(logprobs))
    return {"token_ids": ids, "logprobs": logprobs, "perplexity": perplexity}
