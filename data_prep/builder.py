"""Stage 2 of a build: a TFDS builder packing cached images + rows into ArrayRecord.

The dataset holds one record per image (the record contract of DESIGN.md):
`image` as a zlib-compressed uint16 Tensor (TFDS image features need
TensorFlow; this one does not), the ids, laterality, view, the caption and
label fields and the lesion boxes (mapped from source to stored pixels here,
through the crop box the decoder recorded in the manifest). Read it with `tfds.builder_from_directory(path).as_data_source()`
or `tfds.data_source("mammography/<config>", data_dir=...)`, and feed a split
to `grain.MapDataset.source`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_prep import prepare, schema

VERSION = "1.0.0"
CONFIGS = ("embed", "rsna", "vindr")


def record_features() -> tfds.features.FeaturesDict:
    feats = {"image": tfds.features.Tensor(shape=(None, None), dtype=np.uint16,
                                           encoding=tfds.features.Encoding.ZLIB)}
    feats.update({k: tfds.features.Text() for k in schema.TEXT_FIELDS})
    feats.update({k: tfds.features.Scalar(dtype=np.int32) for k in schema.INT_FIELDS})
    return tfds.features.FeaturesDict(feats)


class Mammography(tfds.core.GeneratorBasedBuilder):
    """Mammograms with their table fields; one builder config per source dataset."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n} mammograms")
                       for n in CONFIGS]

    def __init__(self, *, rows: list[dict] | None = None, cache_dir: str | None = None,
                 **kwargs):
        # rows/cache_dir are needed only to build; reading needs neither.
        self._rows = rows or []
        self._cache_dir = cache_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=record_features(),
            description="Breast-cropped mammograms (uint16, MONOCHROME2 sense) and "
                        "anonymised table fields, built by mama_jax data_prep.",
            homepage="https://github.com/mama-jax/mama_jax",
        )

    def _split_generators(self, dl_manager):
        _pass_through_compressed(self.info.features["image"])
        self._manifest = prepare.read_manifest(self._cache_dir) if self._cache_dir else {}
        by_split = {s: [r for r in self._rows if r["split"] == s] for s in schema.SPLITS}
        return {s: self._generate_examples(rows) for s, rows in by_split.items() if rows}

    def _generate_examples(self, rows):
        for row in rows:
            record = {k: row[k] for k in schema.ROW_FIELDS}
            record["image"] = prepare.read_cached(self._cache_dir, row["image_id"])
            record["roi_boxes"] = self._stored_boxes(row, record["image"].shape)
            yield row["image_id"], record

    def _stored_boxes(self, row: dict, shape: tuple[int, int]) -> str:
        """The row's lesion boxes (source pixels) mapped onto the stored image."""
        where = f"image {row['image_id']}: roi_boxes"
        boxes = schema.parse_boxes(row["roi_boxes"], where)
        if not boxes:
            return schema.UNKNOWN_TEXT
        transform = prepare.transform_of(self._manifest.get(row["image_id"], {}))
        if transform is None or (transform.height, transform.width) != tuple(shape):
            raise ValueError(f"{where}: {prepare.MANIFEST} in {self._cache_dir} has no crop box "
                             f"matching the cached image; rebuild so the image is decoded again")
        mapped = [transform.map_box(b) for b in boxes]
        return schema.format_boxes(b for b in mapped if b is not None)


def _pass_through_compressed(feature: tfds.features.Tensor) -> None:
    """Let the image feature take bytes the decode workers already compressed.

    A zlib Tensor stores {"value": zlib(raw buffer), "shape": shape}; the cache
    holds exactly that, made in parallel, so the single-process writer only
    copies it. Readers see a plain Tensor(uint16, zlib) and need nothing of ours.
    """
    encode = feature.encode_example

    def encode_example(value):
        if isinstance(value, prepare.CompressedImage):
            return {"value": value.data, "shape": value.shape}
        return encode(value)

    feature.encode_example = encode_example
