"""input/records.py: our decode of data_prep's records against TFDS's own decode."""

import zlib

import numpy as np
import pytest

from mama_jax.input import pipeline, records


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_field_of_every_record_equals_tfds_decode(tiny_dataset, split):
    source = pipeline.open_split(tiny_dataset, split)
    assert isinstance(source, records.RecordSource) and source.plan is not None
    reference = source.tfds_source
    assert len(source) == len(reference) > 0
    for i in range(len(source)):
        ours, theirs = source[i], reference[i]
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, np.ndarray):
                assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
                np.testing.assert_array_equal(ours[key], value, err_msg=key)
            else:
                assert type(ours[key]) is type(value) and ours[key] == value, key
        np.testing.assert_array_equal(source.image(i), theirs["image"])
        np.testing.assert_array_equal(records.image_of(source, i), theirs["image"])


def test_inflate_matches_zlib_and_checks_the_length():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, size=(37, 53), dtype=np.uint16).tobytes()
    stream = zlib.compress(raw, 1)
    assert records.inflate(stream, len(raw)) == raw
    with pytest.raises((ValueError, *records._INFLATE_ERRORS)):
        records.inflate(stream, len(raw) - 2)  # the header's shape disagrees with the stream


def test_a_corrupt_image_names_the_record(tiny_dataset):
    source = pipeline.open_split(tiny_dataset, "train")
    good = source.data_source[0]
    from tensorflow_datasets.proto import tf_example_pb2

    example = tf_example_pb2.Example.FromString(good)
    value = example.features.feature["image/value"].bytes_list.value
    value[0] = value[0][: len(value[0]) // 2]  # a truncated zlib stream

    class Raw:  # the array_record source with record 0 damaged
        def __getitem__(self, i):
            return example.SerializeToString() if i == 0 else source.tfds_source.data_source[i]

    class Tfds:
        data_source, dataset_info, split = Raw(), source.dataset_info, "train"

        def __len__(self):
            return len(source)

    broken = records.RecordSource(Tfds())
    with pytest.raises(ValueError, match="record 0 of split 'train'"):
        broken[0]
    assert broken[1]["image"].shape == source[1]["image"].shape
