"""Training a byte-level BPE tokenizer from scratch (for models m3 pretrains itself).

Uses the `tokenizers` library; the result is a transformers fast tokenizer with BOS, EOS and
PAD, saved into model dirs like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import M3Error

SPECIAL = ("<s>", "</s>", "<pad>")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts`, at most `vocab_size` tokens (fewer when the
    corpus has fewer merges to offer). Returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL):
        raise M3Error(f"a byte-level tokenizer needs a vocabulary of at least {256 + len(SPECIAL)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
