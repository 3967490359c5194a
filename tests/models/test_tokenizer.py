"""Caption tokenizer: MaMA special tokens, SEP substitution, BOS/EOS-safe truncation, padding."""

import numpy as np
import pytest

from mama_jax.input.tokenizer import (EOS_TOKEN, SPECIAL_TOKENS, build_tiny_tokenizer, encode_caption,
                                       encode_captions, load_tokenizer)

CAPTION = ("Procedure reported: MG Screening Bilateral;\nReason for procedure: screening;\n"
           "Patient info: This patient is White, Non-Hispanic or Latino, and 56 years old.\n"
           "Breast composition: The breast is heterogeneously dense. This may lower the sensitivity "
           "of mammography.")
CORPUS = [CAPTION, "Impressions: BI-RADS Category 1: negative.", "Overall Assessment: Negative."] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), CORPUS)
    return load_tokenizer(folder)


def test_special_tokens_are_added_after_the_base_vocab(tok):
    hf = tok.hf
    assert tok.num_added_tokens == 6 and tok.vocab_size == tok.base_vocab_size + 6
    assert 256 < tok.base_vocab_size <= 400
    assert hf.convert_ids_to_tokens(tok.eos_id) == EOS_TOKEN
    assert hf.convert_ids_to_tokens(tok.sep_id) == SPECIAL_TOKENS["sep_token"]
    added = {tok.bos_id, tok.pad_id, tok.sep_id, hf.mask_token_id, hf.unk_token_id,
             hf.convert_tokens_to_ids("<|keytext|>")}
    assert added == set(range(tok.base_vocab_size, tok.base_vocab_size + 6))
    tok.check_model(tok.base_vocab_size, 6)
    with pytest.raises(ValueError, match="embeds"):
        tok.check_model(tok.base_vocab_size, 0)


def test_encode_caption_substitutes_sep_and_wraps(tok):
    ids, mask, truncated = encode_caption(tok, CAPTION, 144)
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (144,) and not truncated
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
    assert (ids == tok.sep_id).sum() == CAPTION.count(".") + CAPTION.count(";") == 5
    body = tok.hf.decode(ids[1:n - 1].tolist())
    want = CAPTION.replace("\n", " ").replace(".", "<|separatetext|>").replace(";", "<|separatetext|>")
    assert body == want
    # A newline and a space give the same tokens.
    same = encode_caption(tok, CAPTION.replace("\n", " "), 144)
    np.testing.assert_array_equal(same.input_ids, ids)


def test_truncation_keeps_bos_and_eos(tok):
    full = encode_caption(tok, CAPTION, 144)
    n = int(full.attention_mask.sum())
    short = encode_caption(tok, CAPTION, 12)
    assert short.truncated and short.attention_mask.all()
    assert short.input_ids[0] == tok.bos_id and short.input_ids[-1] == tok.eos_id
    np.testing.assert_array_equal(short.input_ids[1:-1], full.input_ids[1:11])
    exact = encode_caption(tok, CAPTION, n)  # fits exactly: no truncation, no padding
    assert not exact.truncated and exact.attention_mask.all()
    np.testing.assert_array_equal(exact.input_ids, full.input_ids[:n])
    with pytest.raises(ValueError, match="max_length"):
        encode_caption(tok, CAPTION, 1)


def test_batch_matches_single(tok):
    texts = [CAPTION, "Overall Assessment: Negative.", ""]
    batch = encode_captions(tok, texts, 40)
    assert batch.input_ids.shape == (3, 40)
    for i, text in enumerate(texts):
        one = encode_caption(tok, text, 40)
        np.testing.assert_array_equal(batch.input_ids[i], one.input_ids)
        np.testing.assert_array_equal(batch.attention_mask[i], one.attention_mask)
        assert batch.truncated[i] == one.truncated
    assert list(batch.truncated) == [True, False, False]
    assert batch.attention_mask[2].sum() == 2  # empty caption: BOS, EOS


def test_bad_tokenizer_path_is_named(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ValueError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
