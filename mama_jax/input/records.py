"""Random access to data_prep's records, decoded without TFDS's feature connectors.

A record is a serialised tf.train.Example: text fields as bytes, integer fields as int64,
and `image` as TFDS's zlib Tensor (`image/value`: the zlib stream of the raw little-endian
buffer, `image/shape`). TFDS's own data source decodes it correctly but slowly: reading a
1036 px record is almost all zlib inflate. This reader parses the same bytes and inflates
the image with libdeflate (the `deflate` package), which decodes the same zlib stream about
twice as fast as zlib; `zlib` stays the fallback where the package is missing. Records are
read as they are: nothing in the record contract changes, and `tests/test_records.py` checks
every field against TFDS's decode.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

try:  # libdeflate: whole-buffer inflate of a stream whose decoded size is known
    import deflate as _libdeflate
    _INFLATE_ERRORS = (zlib.error, _libdeflate.DeflateError)
except ImportError:  # pragma: no cover - the pinned install has it
    _libdeflate = None
    _INFLATE_ERRORS = (zlib.error,)


def inflate(data: bytes, nbytes: int) -> bytes:
    """The zlib stream `data`, decoded; `nbytes` is its known decoded length."""
    if _libdeflate is not None:
        return _libdeflate.zlib_decompress(data, nbytes)
    out = zlib.decompress(data)
    if len(out) != nbytes:
        raise ValueError(f"zlib stream decodes to {len(out)} bytes, the shape says {nbytes}")
    return out


def example_features(raw: bytes):
    """A serialised tf.train.Example's feature map (name -> Feature), nothing decoded."""
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example.FromString(raw).features.feature


def _field_plan(features) -> dict[str, tuple[str, Any]] | None:
    """name -> (kind, numpy dtype) for the features this reader decodes itself, or None
    when some feature is of a kind it does not know (the TFDS decode is used then)."""
    import tensorflow_datasets as tfds

    plan: dict[str, tuple[str, Any]] = {}
    for name, feature in features.items():
        if isinstance(feature, tfds.features.Text):
            plan[name] = ("text", None)
        elif isinstance(feature, tfds.features.Tensor) and feature.shape == ():
            if feature.np_dtype.kind not in "iu":
                return None
            plan[name] = ("int", None)
        elif (isinstance(feature, tfds.features.Tensor)
              and feature._encoding == tfds.features.Encoding.ZLIB):
            plan[name] = ("zlib", np.dtype(feature.np_dtype).newbyteorder("<"))
        else:
            return None
    return plan


class RecordSource(Sequence):
    """source[i] -> the record as TFDS gives it (text as bytes, ints as int, the image as
    a numpy array); source.image(i) -> the image alone. Wraps the TFDS data source of
    `pipeline.open_split`, whose decode is kept for any dataset with other feature kinds."""

    def __init__(self, tfds_source):
        self.tfds_source = tfds_source
        self.plan = _field_plan(tfds_source.dataset_info.features)

    # what study_index and the benchmarks read of the TFDS source
    dataset_info = property(lambda self: self.tfds_source.dataset_info)
    data_source = property(lambda self: self.tfds_source.data_source)  # index -> raw bytes
    split = property(lambda self: self.tfds_source.split)

    def __len__(self) -> int:
        return len(self.tfds_source)

    def _example(self, index: int):
        return example_features(self.data_source[index])

    def _decode(self, feature, name: str, kind: str, dtype) -> Any:
        if kind == "text":
            return feature[name].bytes_list.value[0]
        if kind == "int":
            return int(feature[name].int64_list.value[0])
        shape = tuple(feature[f"{name}/shape"].int64_list.value)
        data = feature[f"{name}/value"].bytes_list.value[0]
        buf = inflate(data, int(np.prod(shape)) * dtype.itemsize)
        return np.frombuffer(buf, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self.plan is None:
            return self.tfds_source[index]
        feature = self._example(index)
        try:
            return {name: self._decode(feature, name, kind, dtype)
                    for name, (kind, dtype) in self.plan.items()}
        except (IndexError, ValueError, *_INFLATE_ERRORS) as e:
            raise ValueError(f"record {index} of split {self.split!r}: {e}") from e

    def image(self, index: int, name: str = "image") -> np.ndarray:
        """One record's image without decoding its other fields (a second view needs no text)."""
        index = int(index)
        if self.plan is None:
            return self.tfds_source[index][name]
        kind, dtype = self.plan[name]
        return self._decode(self._example(index), name, kind, dtype)



def image_of(source: Sequence, index: int) -> np.ndarray:
    """source[index]["image"], decoding only the image where the source can."""
    return source.image(index) if isinstance(source, RecordSource) else source[index]["image"]
