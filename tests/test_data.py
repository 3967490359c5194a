"""Grain pipeline: study index, second views, captions/tokens, determinism, hosts, eval."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import build, synthetic
from mama_jax.input import augment, captions, pipeline, tokenizer as tokenizer_lib

S, BATCH, MAX_LEN = 56, 4, 256


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.generate(root / "raw", patients=4, seed=0, image_size=(128, 96))
    build.build("embed", root / "raw", root / "raw", root / "out", workers=1, long_side=128)
    return build.dataset_dir(str(root / "out"), "embed")


@pytest.fixture(scope="module")
def train_records(dataset_dir):
    source = pipeline.open_split(dataset_dir, "train")
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, train_records):
    corpus = [captions.build_caption(r) for r in train_records]
    path = tokenizer_lib.build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), corpus,
                                              vocab_size=1000)
    return tokenizer_lib.load_tokenizer(path)


@pytest.fixture(scope="module")
def cfg(dataset_dir):
    return pipeline.DataConfig(dataset_dir=dataset_dir, image_size=S, global_batch_size=BATCH,
                           max_length=MAX_LEN, num_threads=2, prefetch=2)


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------- opening

def test_open_split_errors_name_the_folder_and_split(dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        pipeline.open_split(str(tmp_path), "train")
    with pytest.raises(KeyError, match="validation.*train"):
        pipeline.open_split(dataset_dir, "validation")  # 4 patients: no validation images


def test_config_is_validated(dataset_dir):
    with pytest.raises(ValueError, match="second_view"):
        pipeline.DataConfig(dataset_dir=dataset_dir, second_view="other_study")
    with pytest.raises(ValueError, match="p_self"):
        pipeline.DataConfig(dataset_dir=dataset_dir, p_self=1.5)
    with pytest.raises(ValueError, match="caption_style"):
        pipeline.DataConfig(dataset_dir=dataset_dir, caption_style="poem")


# ----------------------------------------------------------------------------- study index

@pytest.mark.parametrize("strategy", pipeline.SECOND_VIEWS)
def test_study_index_matches_brute_force(dataset_dir, train_records, strategy):
    index = pipeline.study_index(pipeline.open_split(dataset_dir, "train"), strategy)
    assert len(index) == len(train_records)
    for i, cands in enumerate(index):
        a = train_records[i]
        expected = set()
        if strategy != "same_image":
            for j, b in enumerate(train_records):
                same_side = _text(a["laterality"]) == _text(b["laterality"])
                if j != i and _text(a["study_id"]) == _text(b["study_id"]) and (
                        strategy != "intra_side" or same_side):
                    expected.add(j)
        assert set(cands.tolist()) == expected and len(cands) == len(expected)
    if strategy != "same_image":
        assert sum(len(c) > 0 for c in index) > len(index) // 2  # studies really have partners


def test_study_index_cache_and_plain_sequences_agree(dataset_dir, train_records):
    source = pipeline.open_split(dataset_dir, "train")
    fresh = pipeline.study_index(source, "intra_side")
    cache_dir = os.path.join(dataset_dir, "mama_jax_index")
    assert [f for f in os.listdir(cache_dir) if f.startswith("train-") and f.endswith(".npz")]
    cached = pipeline.study_index(source, "intra_side")
    plain = pipeline.study_index(train_records, "intra_side")  # any sequence of record dicts
    for a, b, c in zip(fresh, cached, plain):
        assert a.tolist() == b.tolist() == c.tolist()


def test_unknown_laterality_has_no_intra_side_partner():
    records = [{"study_id": b"s1", "laterality": b"L"}, {"study_id": b"s1", "laterality": b"L"},
               {"study_id": b"s1", "laterality": b""}, {"study_id": b"s1", "laterality": b""},
               {"study_id": b"s2", "laterality": b"L"}]
    side = pipeline.study_index(records, "intra_side")
    assert [c.tolist() for c in side] == [[1], [0], [], [], []]
    study = pipeline.study_index(records, "intra_study")
    assert [c.tolist() for c in study] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], []]


@pytest.mark.parametrize("strategy", ["intra_study", "intra_side"])
def test_choose_second_view_rules_and_p_self_rate(strategy):
    """intra_study and intra_side (the official --inter_view) both take the anchor itself,
    re-augmented, with p_self (D16); intra_study_no_self never does."""
    cands = np.array([3, 5, 9], np.int32)
    rng = np.random.default_rng(0)
    draws = [pipeline.choose_second_view(1, cands, strategy, 0.5, rng) for _ in range(4000)]
    assert set(draws) <= {1, 3, 5, 9}
    # 4000 draws of p = 0.5: standard error 0.008, so 0.04 is 5 sigma
    assert abs(np.mean(np.array(draws) == 1) - 0.5) < 0.04
    others = np.array([d for d in draws if d != 1])
    assert all(abs(np.mean(others == c) - 1 / 3) < 0.05 for c in cands)  # uniform over the group
    assert pipeline.choose_second_view(1, cands[:0], strategy, 0.5, rng) == 1  # fallback: anchor
    picks = {pipeline.choose_second_view(1, cands, "intra_study_no_self", 0.5, rng) for _ in range(200)}
    assert picks == {3, 5, 9}
    assert pipeline.choose_second_view(1, cands[:0], "intra_study_no_self", 0.5, rng) == 1
    assert pipeline.choose_second_view(1, cands, "same_image", 0.5, rng) == 1
    assert pipeline.choose_second_view(1, cands, "intra_study", 1.0, rng) == 1


# ----------------------------------------------------------------------------- train batches

def test_train_batch_shapes_dtypes_ranges(cfg, tok, train_records):
    batch = next(pipeline.train_iterator(cfg, tok))
    expect = {"view1": ((BATCH, S, S), np.uint16), "view2": ((BATCH, S, S), np.uint16),
              "input_ids": ((BATCH, MAX_LEN), np.int32), "attention_mask": ((BATCH, MAX_LEN), np.int32),
              "truncated": ((BATCH,), np.bool_), "birads": ((BATCH,), np.int32),
              "density": ((BATCH,), np.int32), "cancer": ((BATCH,), np.int32),
              "index": ((BATCH,), np.int32), "view2_index": ((BATCH,), np.int32)}
    assert set(batch) == set(expect)
    for key, (shape, dtype) in expect.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert not np.array_equal(batch["view1"], batch["view2"])
    for row, i in enumerate(batch["index"]):
        r = train_records[i]
        assert batch["birads"][row] == r["birads"] and batch["cancer"][row] == r["cancer"]
        assert batch["density"][row] == (r["density"] - 1 if 1 <= r["density"] <= 4 else -1)


@pytest.mark.parametrize("strategy", pipeline.SECOND_VIEWS)
def test_second_views_come_from_the_allowed_set(cfg, tok, train_records, strategy):
    run = dataclasses.replace(cfg, second_view=strategy, image_size=16, global_batch_size=28)
    batches = _take(pipeline.train_iterator(run, tok), 3)
    index = np.concatenate([b["index"] for b in batches])
    other = np.concatenate([b["view2_index"] for b in batches])
    allowed = pipeline.study_index(train_records, strategy)
    self_rate_with_partners = []
    for i, j in zip(index, other):
        if strategy == "same_image" or (len(allowed[i]) == 0):
            assert j == i
        else:
            assert j == i or j in allowed[i]
            self_rate_with_partners.append(j == i)
            if strategy not in ("intra_study", "intra_side"):
                assert j != i
    if strategy in ("intra_study", "intra_side"):  # p_self 0.5, within 4 standard errors
        n = len(self_rate_with_partners)
        assert n >= 20
        assert abs(np.mean(self_rate_with_partners) - 0.5) < 4 * 0.5 / np.sqrt(n)


def test_captions_masked_in_training_and_tokens_well_formed(cfg, tok, train_records):
    batch = _take(pipeline.train_iterator(cfg, tok), 2)[1]
    texts = [tok.hf.decode(ids[m == 1]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert any("unknown" in t for t in texts)
    full = dataclasses.replace(cfg, mask_prob=1.0)
    for ids, mask in zip(*(next(pipeline.train_iterator(full, tok))[k] for k in ("input_ids", "attention_mask"))):
        text = tok.hf.decode(ids[mask == 1])
        assert "This patient is unknown, unknown, and unknown years old" in text
        assert "mammogram of the unknown breast with unknown view" in text
    for ids, mask, trunc in zip(batch["input_ids"], batch["attention_mask"], batch["truncated"]):
        n = int(mask.sum())
        assert np.all(mask[:n] == 1) and np.all(mask[n:] == 0)  # one contiguous prefix
        assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id and np.all(ids[n:] == tok.pad_id)
        assert np.sum(ids == tok.sep_id) >= 8 and not trunc


def test_unmasked_train_caption_equals_eval_caption(cfg, tok, train_records):
    batch = next(pipeline.train_iterator(dataclasses.replace(cfg, mask_prob=0.0), tok))
    for row, i in enumerate(batch["index"]):
        want = tokenizer_lib.encode_caption(tok, captions.build_caption(train_records[i]), MAX_LEN)
        np.testing.assert_array_equal(batch["input_ids"][row], want.input_ids)


def test_truncation_keeps_bos_and_eos(cfg, tok):
    batch = next(pipeline.train_iterator(dataclasses.replace(cfg, max_length=24), tok))
    assert batch["truncated"].all() and batch["attention_mask"].all()
    assert np.all(batch["input_ids"][:, 0] == tok.bos_id) and np.all(batch["input_ids"][:, -1] == tok.eos_id)


# ----------------------------------------------------------------------------- order and state

def test_same_seed_same_batches_other_seed_other_order(cfg, tok):
    a, b = (_take(pipeline.train_iterator(cfg, tok), 2) for _ in range(2))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    c = _take(pipeline.train_iterator(dataclasses.replace(cfg, seed=1), tok), 2)
    assert not np.array_equal(np.concatenate([x["index"] for x in a]),
                              np.concatenate([x["index"] for x in c]))


def test_resume_with_get_state_set_state(cfg, tok):
    it = pipeline.train_iterator(cfg, tok)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = pipeline.train_iterator(cfg, tok)
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 2)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_epochs_are_permutations_reshuffled(cfg, tok, train_records):
    n = len(train_records)  # 28 = 7 batches of 4
    run = dataclasses.replace(cfg, image_size=16)
    idx = np.concatenate([b["index"] for b in _take(pipeline.train_iterator(run, tok), 2 * n // BATCH)])
    assert sorted(idx[:n]) == list(range(n)) and sorted(idx[n:]) == list(range(n))
    assert not np.array_equal(idx[:n], idx[n:])


def test_hosts_read_disjoint_blocks_of_one_global_stream(cfg, tok, train_records):
    n = len(train_records)
    run = dataclasses.replace(cfg, image_size=16)
    single = _take(pipeline.train_iterator(run, tok), n // BATCH)  # one epoch
    hosts = [_take(pipeline.train_iterator(run, tok, process_index=p, process_count=2), n // BATCH)
             for p in range(2)]
    assert all(b["index"].shape == (BATCH // 2,) for b in hosts[0])
    one_epoch = [np.concatenate([b["index"] for b in h]) for h in hosts]
    assert not set(one_epoch[0]) & set(one_epoch[1])
    assert set(one_epoch[0]) | set(one_epoch[1]) == set(range(n))
    # Host p's k-th batch is block p of global batch k, views and all (rng by global
    # position): the hosts' pieces, in process order, are the single host's batch.
    for k, whole in enumerate(single):
        for key in ("index", "view2_index", "view1", "input_ids"):
            parts = np.concatenate([hosts[p][k][key] for p in range(2)])
            np.testing.assert_array_equal(parts, whole[key])
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_iterator(run, tok, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.train_iterator(run, tok, process_index=2, process_count=2)


# ----------------------------------------------------------------------------- eval

def test_eval_sees_every_record_once_with_valid_mask(cfg, tok, dataset_dir):
    source = pipeline.open_split(dataset_dir, "test")
    n = len(source)  # 8 test images
    per_host = []
    for p in range(3):
        batches = list(pipeline.eval_iterator(cfg, tok, "test", process_index=p, process_count=3,
                                          batch_size=2))
        per_host.append(batches)
        for b in batches:
            assert b["view1"].shape == (2, S, S) and b["view1"].dtype == np.uint16
            assert b["valid"].dtype == np.bool_
            assert "view2" not in b
            assert np.all((b["index"] == -1) == ~b["valid"])
    assert len({len(b) for b in per_host}) == 1  # every host steps the same number of times
    assert len(per_host[0]) == pipeline.eval_batches_per_host(n, 2, 3) == 2
    seen = np.concatenate([b["index"][b["valid"]] for h in per_host for b in h])
    assert sorted(seen) == list(range(n))


def test_eval_uses_eval_transform_and_unmasked_captions(cfg, tok, dataset_dir):
    source = pipeline.open_split(dataset_dir, "test")
    batch = next(pipeline.eval_iterator(cfg, tok, "test", batch_size=3))
    for row, i in enumerate(batch["index"]):
        record = source[int(i)]
        np.testing.assert_array_equal(batch["view1"][row], augment.eval_view(record["image"], S))
        want = tokenizer_lib.encode_caption(tok, captions.build_caption(record), MAX_LEN)
        np.testing.assert_array_equal(batch["input_ids"][row], want.input_ids)
        np.testing.assert_array_equal(batch["attention_mask"][row], want.attention_mask)


def _device_input(grey):
    """What the ViT feeds its patch kernel from a grey batch (models/vit.py), per channel."""
    return np.asarray(grey.astype(jnp.float32) * jnp.float32(2.0 / 65535.0) - jnp.float32(1.0))


def test_grey_transfer_gives_the_tower_the_host_normalised_input(cfg, tok, dataset_dir):
    rgb = dataclasses.replace(cfg, transfer="rgb_float32")
    for grey_it, rgb_it, bound in (
            # eval: the same uint16 view; only float32 rounding of 2 k / 65535 - 1 differs
            (pipeline.eval_iterator(cfg, tok, "test", batch_size=3),
             pipeline.eval_iterator(rgb, tok, "test", batch_size=3), 1e-6),
            # train: a jittered or blurred view is rounded to uint16, half a step of 2 / 65535
            (pipeline.train_iterator(cfg, tok), pipeline.train_iterator(rgb, tok), 1 / 65535 + 1e-6)):
        grey, host = next(grey_it), next(rgb_it)
        assert grey["view1"].dtype == np.uint16 and host["view1"].shape == grey["view1"].shape + (3,)
        assert 6 * grey["view1"].nbytes == host["view1"].nbytes
        np.testing.assert_array_equal(grey["index"], host["index"])
        for key in [k for k in ("view1", "view2") if k in grey]:
            np.testing.assert_allclose(_device_input(grey[key]), host[key][..., 0], rtol=0,
                                       atol=bound, err_msg=key)
            assert (host[key] == host[key][..., :1]).all()  # three equal channels
    with pytest.raises(ValueError, match="DataConfig.transfer"):
        dataclasses.replace(cfg, transfer="uint8")
