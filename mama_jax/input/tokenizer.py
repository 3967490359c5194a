"""Caption tokenizer: BioMedLM's byte-level BPE plus MaMA's special tokens.

MaMA adds bos/pad/mask/sep/unk/key tokens (EOS stays `<|endoftext|>`), turns
every "." and ";" into SEP, and wraps captions as BOS + body + EOS, right
padded. Unlike the official code, truncation cuts the body so BOS and EOS
always survive (D21). `build_tiny_tokenizer` makes a small stand-in for tests
and the demo (no hub access needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"
# Order = id order of the added rows (appended after the base vocabulary).
SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "pad_token": "<|padtext|>",
    "mask_token": "<|masktext|>",
    "sep_token": "<|separatetext|>",
    "unk_token": "<|unknowntext|>",
}
EXTRA_TOKENS = ("<|keytext|>",)
SENTENCE_ENDS = (".", ";")


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A transformers tokenizer with MaMA's special tokens and their ids."""

    hf: Any
    bos_id: int
    eos_id: int
    pad_id: int
    sep_id: int
    base_vocab_size: int  # tokenizer size before the special tokens were added
    num_added_tokens: int  # how many of them were new

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def sep_token(self) -> str:
        return SPECIAL_TOKENS["sep_token"]

    def check_model(self, vocab_size: int, num_added_tokens: int) -> None:
        """The decoder embeds ids < vocab_size from wte and the rest from added rows."""
        if vocab_size + num_added_tokens != self.vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the text model embeds "
                f"{vocab_size} pretrained + {num_added_tokens} added = {vocab_size + num_added_tokens}")


def load_tokenizer(path_or_hub_id: str) -> TextTokenizer:
    """AutoTokenizer from a local folder (or hub id, if the hub is reachable) + MaMA tokens."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(os.fspath(path_or_hub_id))
    except Exception as err:
        raise ValueError(f"{path_or_hub_id}: cannot load a tokenizer: {err}") from err
    base = len(hf)
    if EOS_TOKEN not in hf.get_vocab():
        raise ValueError(f"{path_or_hub_id}: tokenizer has no {EOS_TOKEN} token (not a GPT-2 BPE?)")
    added = hf.add_special_tokens({**SPECIAL_TOKENS, "eos_token": EOS_TOKEN,
                                   "additional_special_tokens": list(EXTRA_TOKENS)})
    ids = {name: hf.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
    return TextTokenizer(hf=hf, bos_id=ids["bos_token"], eos_id=hf.convert_tokens_to_ids(EOS_TOKEN),
                         pad_id=ids["pad_token"], sep_id=ids["sep_token"],
                         base_vocab_size=base, num_added_tokens=added)


class EncodedCaption(NamedTuple):
    input_ids: np.ndarray  # int32 [L] (or [N, L] for batches)
    attention_mask: np.ndarray  # int32, 1 on BOS..EOS
    truncated: np.ndarray | bool  # the body was cut to fit max_length


def caption_body(tok: TextTokenizer, text: str) -> str:
    """Newlines -> spaces; every "." and ";" -> the SEP token."""
    text = text.replace("\r", " ").replace("\n", " ")
    for mark in SENTENCE_ENDS:
        text = text.replace(mark, tok.sep_token)
    return text


def _assemble(tok: TextTokenizer, body_ids: Sequence[int], max_length: int) -> EncodedCaption:
    room = max_length - 2
    truncated = len(body_ids) > room
    ids = [tok.bos_id, *body_ids[:room], tok.eos_id]
    out = np.full((max_length,), tok.pad_id, np.int32)
    mask = np.zeros((max_length,), np.int32)
    out[: len(ids)] = ids
    mask[: len(ids)] = 1
    return EncodedCaption(out, mask, truncated)


def encode_caption(tok: TextTokenizer, text: str, max_length: int) -> EncodedCaption:
    """BOS + body + EOS, right-padded with PAD to max_length; body truncated if needed."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS + EOS), got {max_length}")
    body = tok.hf(caption_body(tok, text), add_special_tokens=False)["input_ids"]
    return _assemble(tok, body, max_length)


def encode_captions(tok: TextTokenizer, texts: Iterable[str], max_length: int) -> EncodedCaption:
    """Batch version (one Rust batch call): arrays [N, L], truncated [N] bool."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS + EOS), got {max_length}")
    texts = [caption_body(tok, t) for t in texts]
    if not texts:
        empty = np.zeros((0, max_length), np.int32)
        return EncodedCaption(empty, empty.copy(), np.zeros((0,), bool))
    bodies = tok.hf(texts, add_special_tokens=False)["input_ids"]
    rows = [_assemble(tok, b, max_length) for b in bodies]
    return EncodedCaption(np.stack([r.input_ids for r in rows]), np.stack([r.attention_mask for r in rows]),
                          np.array([r.truncated for r in rows], bool))


def build_tiny_tokenizer(out_dir: str, corpus_texts: Iterable[str], vocab_size: int = 400) -> str:
    """Train a small byte-level BPE (GPT-2 style) and save it as a transformers folder.

    Stand-in for BioMedLM's tokenizer in tests and the demo; `<|endoftext|>` is
    its EOS. Returns out_dir.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t.replace("\n", " ") for t in corpus_texts]
    if not texts:
        raise ValueError("build_tiny_tokenizer: corpus_texts is empty")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # Like GPT-2: EOS doubles as BOS/UNK in the base tokenizer; MaMA's tokens come on load.
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        if json.load(f).get("eos_token") != EOS_TOKEN:
            raise RuntimeError(f"{out_dir}: saved tokenizer lost its eos_token")
    return out_dir
