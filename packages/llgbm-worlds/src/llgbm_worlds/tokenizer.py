"""The tiny world's word-level tokenizer (``tokenizers`` WordLevel, saved as a fast tokenizer).

Words, numbers and punctuation are one token each (lower-cased). The prompt frame costs three
tokens: each of the five Alpaca headers and the two ``###`` tags are added tokens, so the tiny
model spends its capacity on the task, not on spelling the frame. The vocabulary covers every
word of the generic probes, so they tokenize without ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llgbm_worlds.frame import HEADERS, INSTRUCTION_TAG, RESPONSE_TAG

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()  # \w+|[^\w\s]+


def words_of(texts: Iterable[str], *, strip_frame: bool = True) -> set[str]:
    """The word tokens the tiny tokenizer makes of ``texts`` (frame pieces removed first)."""
    pre = _pre_tokenizer()
    out: set[str] = set()
    for text in texts:
        if strip_frame:
            for piece in (*HEADERS, INSTRUCTION_TAG, RESPONSE_TAG):
                text = text.replace(piece, " ")
        out.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return out


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` plus the frame.

    The vocabulary is sorted, so the same texts always give the same ids. The header words are in
    it too, so a header written differently still tokenizes without ``<unk>``.
    """
    vocab_words = sorted(words_of(texts) | words_of(HEADERS, strip_frame=False))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    # Frame pieces are matched on the raw text before normalisation and splitting.
    tok.add_tokens(
        [AddedToken(p, normalized=False) for p in (*HEADERS, INSTRUCTION_TAG, RESPONSE_TAG)]
    )
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
