"""MaMA's choice of sentence features for the local branch (MaMAConfig.sentence_features)."""

import numpy as np
import pytest
from flax import nnx

from mama_jax.models import mama
from mama_jax.models.text import text_config
from mama_jax.models.vit import vit_config

SEP = 9


def _model(sentence_features: str) -> mama.MaMA:
    cfg = mama.MaMAConfig(vit=vit_config("tiny"), text=text_config("tiny", vocab_size=32),
                          sep_id=SEP, embed_dim=16, local_hidden=32, simclr_out=8,
                          max_sentences=4, sentence_features=sentence_features)
    return mama.MaMA(cfg, rngs=nnx.Rngs(0))


def _sentences(model: mama.MaMA, ids: np.ndarray) -> np.ndarray:
    """The local sentence embeddings of one caption, in eval mode (running BN statistics,
    so each sentence's embedding depends on its own input only)."""
    batch = {"view1": np.zeros((1, 28, 28, 3), np.float32),
             "view2": np.zeros((1, 28, 28, 3), np.float32),
             "input_ids": ids[None], "attention_mask": np.ones((1, ids.size), np.int32)}
    return np.asarray(model(batch, train=False)["sent"])[0]


@pytest.mark.parametrize("kind, second_moves", [("sep", True), ("token_mean", False)])
def test_second_sentence_sees_the_first_only_through_sep_states(kind, second_moves):
    model = _model(kind)
    ids = np.array([1, 4, 5, SEP, 6, 7, SEP, 2], np.int32)
    edited = ids.copy()
    edited[1] = 11  # a word of the first sentence
    before, after = _sentences(model, ids), _sentences(model, edited)
    assert not np.allclose(before[0], after[0], atol=1e-6)  # the first sentence moves
    # SEP states are causal: the second sentence's state summarises its prefix too.
    assert np.allclose(before[1], after[1], atol=1e-6) != second_moves


def test_unknown_sentence_features_names_the_field():
    with pytest.raises(ValueError, match="sentence_features='cls'"):
        _model("cls")
