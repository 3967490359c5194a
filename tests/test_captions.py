"""Captions: exact §3.1 wording, §3.2 masking statistics, styles, §4.1 prompts."""
import re

import numpy as np
import pytest

from mama_jax.input import captions as cap


def _record(**overrides):
    """A TFDS-like record: text as bytes, ints as numpy ints (plus fields captions ignore)."""
    rec = {
        "procedure": b"MG Screening Bilateral w/CAD", "reason": b"screening",
        "race": b"African American or Black", "ethnicity": b"Non-Hispanic or Latino",
        "image_type": b"2D", "laterality": b"L", "view": b"CC",
        "mass_shape": b"irregular", "mass_density": b"high density",
        "calc_type": b"pleomorphic", "calc_distribution": b"segmental",
        "age": np.int64(56), "density": np.int64(3), "birads": np.int64(4),
        "cancer": np.int64(1), "split": b"train", "image_id": b"1.2.3",
    }
    rec.update(overrides)
    return rec


def _negative_record(**overrides):
    base = dict(procedure=b"MG Diagnostic Left", reason=b"diagnostic", race=b"White",
                laterality=b"R", view=b"MLO", mass_shape=b"", mass_density=b"", calc_type=b"",
                calc_distribution=b"", age=np.int64(71), density=np.int64(2),
                birads=np.int64(1))
    base.update(overrides)
    return _record(**base)


BIRADS4 = (
    "Procedure reported: MG Screening Bilateral w/CAD;\n"
    "Reason for procedure: screening;\n"
    "Patient info: This patient is African American or Black, Non-Hispanic or Latino, "
    "and 56 years old.\n"
    "Image info: This is a 2D full-field digital mammogram of the left breast with CC view.\n"
    "Breast composition: The breast is heterogeneously dense. "
    "This may lower the sensitivity of mammography.\n"
    "Findings: The mammogram shows that a suspicious abnormality is present. "
    "The mass is irregular and high density. A segmental pleomorphic calcification is present.\n"
    "Impressions: BI-RADS Category 4: suspicious abnormality.\n"
    "Overall Assessment: Suspicious abnormality."
)
BIRADS1 = (
    "Procedure reported: MG Diagnostic Left;\n"
    "Reason for procedure: diagnostic;\n"
    "Patient info: This patient is White, Non-Hispanic or Latino, and 71 years old.\n"
    "Image info: This is a 2D full-field digital mammogram of the right breast with MLO view.\n"
    "Breast composition: The breast is scattered fibroglandular densities.\n"
    "Findings: The mammogram shows that no significant masses, calcification, "
    "or other abnormalities are present.\n"
    "Impressions: BI-RADS Category 1: negative.\n"
    "Overall Assessment: Negative."
)

PATIENT_RE = re.compile(r"This patient is (.*), (.*), and (.*) years old\.")
IMAGE_RE = re.compile(r"This is a (.*) full-field digital mammogram of the (.*) breast with (.*) view\.")


def _meta_in(caption):
    """The six meta values as the structured caption shows them, in META_FIELDS order."""
    race, ethnicity, age = PATIENT_RE.search(caption).groups()
    return (age, race, ethnicity) + IMAGE_RE.search(caption).groups()


# ----------------------------------------------------------------------------- structured

def test_full_birads4_caption_is_exact():
    assert cap.build_caption(_record()) == BIRADS4
    assert cap.count_sentences(BIRADS4) == 11 == cap.MAX_SENTENCES["structured"]


def test_birads1_caption_without_mass_or_calc_is_exact():
    text = cap.build_caption(_negative_record())
    assert text == BIRADS1
    assert cap.count_sentences(text) == 8


def test_dense_note_only_for_density_3_and_4():
    for density, has_note in ((1, False), (2, False), (3, True), (4, True)):
        text = cap.build_caption(_negative_record(density=np.int64(density)))
        assert (cap.DENSE_NOTE in text) == has_note, density
        assert f"The breast is {cap.DENSITY_DESC[density]}." in text


def test_mass_and_calc_sentences_need_both_codes():
    text = cap.build_caption(_record(mass_density=b"", calc_type=b""))
    assert "The mass is" not in text and "calcification is present" not in text


def test_missing_values_follow_the_spec():
    text = cap.build_caption(_record(density=np.int64(-1), birads=np.int64(-1),
                                     procedure=b"", reason=b"", age=np.int64(-1), race=b"",
                                     ethnicity=b"", laterality=b"", view=b"", image_type=b""))
    assert text == (
        "Patient info: This patient is unknown, unknown, and unknown years old.\n"
        "Image info: This is a unknown full-field digital mammogram of the unknown breast "
        "with unknown view.")


def test_bytes_str_and_numpy_scalars_give_the_same_caption():
    as_bytes = _record()
    as_str = {k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in as_bytes.items()}
    as_arrays = {k: np.asarray(v) for k, v in as_bytes.items()}
    expected = cap.build_caption(as_bytes)
    assert cap.build_caption(as_str) == expected == cap.build_caption(as_arrays)
    assert cap.record_to_fields(as_bytes) == cap.record_to_fields(as_str)


def test_stray_sentence_marks_in_values_are_removed():
    text = cap.build_caption(_record(procedure=b"MG Diag. Bilateral; w/CAD", race=b"Other."))
    assert "Procedure reported: MG Diag Bilateral w/CAD;" in text
    assert "This patient is Other," in text
    assert cap.count_sentences(text) == 11


def test_bad_records_name_the_field():
    rec = _record()
    del rec["view"]
    with pytest.raises(KeyError, match="view"):
        cap.build_caption(rec)
    with pytest.raises(ValueError, match="birads"):
        cap.build_caption(_record(birads=np.int64(9)))
    with pytest.raises(ValueError, match="density"):
        cap.build_caption(_record(density=np.int64(0)))
    with pytest.raises(ValueError, match="laterality"):
        cap.build_caption(_record(laterality=b"X"))
    with pytest.raises(ValueError, match="age"):
        cap.build_caption(_record(age=b"56"))
    with pytest.raises(ValueError, match="race"):
        cap.build_caption(_record(race=3))
    with pytest.raises(ValueError, match="structured, structured_nomask, tabular, label_only, one_finding"):
        cap.build_caption(_record(), style="natural")


# ----------------------------------------------------------------------------- masking

def test_mask_prob_zero_and_one():
    assert cap.build_caption(_record(), mask_prob=0.0, rng=np.random.default_rng(0)) == BIRADS4
    text = cap.build_caption(_record(), mask_prob=1.0, rng=np.random.default_rng(0))
    assert _meta_in(text) == ("unknown",) * 6
    # never masked: procedure, reason, density, findings, impressions, assessment
    keep = [line for line in BIRADS4.split("\n") if not line.startswith(("Patient", "Image"))]
    assert [line for line in text.split("\n") if not line.startswith(("Patient", "Image"))] == keep


def test_masking_rate_and_independence_at_0_8():
    rng = np.random.default_rng(1234)
    n = 4000
    shown = np.array([_meta_in(cap.build_caption(_record(), mask_prob=0.8, rng=rng))
                      for _ in range(n)])
    masked = shown == "unknown"
    tol = 5 * np.sqrt(0.8 * 0.2 / n)  # 5 binomial standard deviations
    np.testing.assert_allclose(masked.mean(0), 0.8, atol=tol)
    # independent: every pair is masked together at rate 0.8 * 0.8
    joint = (masked[:, :, None] & masked[:, None, :]).mean(0)
    off_diag = joint[~np.eye(6, dtype=bool)]
    np.testing.assert_allclose(off_diag, 0.64, atol=5 * np.sqrt(0.64 * 0.36 / n))
    # unmasked fields show the record's own values
    truth = np.array(["56", "African American or Black", "Non-Hispanic or Latino", "2D", "left", "CC"])
    assert np.all((shown == truth) | masked)


def test_masking_is_deterministic_per_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [cap.build_caption(_record(), mask_prob=0.8, rng=rng) for _ in range(20)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    with pytest.raises(ValueError, match="rng"):
        cap.build_caption(_record(), mask_prob=0.5)
    with pytest.raises(ValueError, match="mask_prob"):
        cap.build_caption(_record(), mask_prob=1.5, rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- styles

def test_nomask_style_ignores_mask_prob():
    rng = np.random.default_rng(0)
    assert cap.build_caption(_record(), style="structured_nomask", mask_prob=1.0, rng=rng) == BIRADS4


def test_one_finding_style():
    text = cap.build_caption(_record(), style="one_finding")
    lesion = "The mass is irregular and high density. A segmental pleomorphic calcification is present."
    assert text == BIRADS4[: BIRADS4.index("Findings:")] + lesion
    assert cap.count_sentences(text) == 8 == cap.MAX_SENTENCES["one_finding"]
    # no lesion fields: the BI-RADS finding sentence alone, no impression lines
    negative = cap.build_caption(_record(birads=np.int64(1), mass_shape=b"", mass_density=b"",
                                         calc_type=b"", calc_distribution=b""), style="one_finding")
    assert negative.endswith("\nFindings: The mammogram shows that no significant masses, "
                             "calcification, or other abnormalities are present.")
    assert "Impressions" not in negative and "Overall Assessment" not in negative
    # masked like structured
    masked = cap.build_caption(_record(), style="one_finding", mask_prob=1.0,
                               rng=np.random.default_rng(0))
    assert "unknown years old" in masked and masked.endswith(lesion)


def test_tabular_style():
    text = cap.build_caption(_record(), style="tabular")
    assert text == (
        "procedure: MG Screening Bilateral w/CAD;\nreason: screening;\nage: 56;\n"
        "race: African American or Black;\nethnicity: Non-Hispanic or Latino;\n"
        "image type: 2D;\nside: left;\nview: CC;\ndensity: 3;\nmass shape: irregular;\n"
        "mass density: high density;\ncalcification type: pleomorphic;\n"
        "calcification distribution: segmental;\nbirads: 4;")
    assert cap.count_sentences(text) == 14 == cap.MAX_SENTENCES["tabular"]
    masked = cap.build_caption(_record(), style="tabular", mask_prob=1.0,
                               rng=np.random.default_rng(0))
    for key in ("age", "race", "ethnicity", "image type", "side", "view"):
        assert f"{key}: unknown;" in masked
    assert "procedure: MG Screening Bilateral w/CAD;" in masked and "birads: 4;" in masked


def test_label_only_style():
    text = cap.build_caption(_negative_record(), style="label_only")
    assert text == "BI-RADS Category 1: negative. The breast is scattered fibroglandular densities."
    assert cap.count_sentences(text) == 2
    assert cap.build_caption(_record(density=np.int64(-1)), style="label_only") == \
        "BI-RADS Category 4: suspicious abnormality."
    with pytest.raises(ValueError, match="birads"):
        cap.build_caption(_record(density=np.int64(-1), birads=np.int64(-1)), style="label_only")


def test_count_sentences():
    assert cap.count_sentences("a. b; c") == 2
    assert cap.count_sentences("no ends") == 0


# ----------------------------------------------------------------------------- zero-shot

def test_birads_prompts():
    prompts = cap.zero_shot_prompts("birads", _record())
    assert len(prompts) == 7 == len(cap.CLASS_NAMES["birads"])
    prefix = BIRADS4.split("\n")[:4]  # own unmasked procedure, reason, patient, image info
    for k, prompt in enumerate(prompts):
        lines = prompt.split("\n")
        assert lines[:4] == prefix
        assert lines[4] == f"Findings: The mammogram shows that {cap.BIRADS_FINDING[k]}."
        assert lines[5] == f"Impressions: BI-RADS Category {k}: {cap.BIRADS_DESC[k]}."
        assert lines[6] == f"Overall Assessment: {cap.BIRADS_ASSESSMENT[k]}."
        assert "Breast composition" not in prompt and "The mass is" not in prompt
    # a record with nothing but its BI-RADS class is captioned exactly as its own prompt
    plain = _negative_record(density=np.int64(-1))
    assert cap.build_caption(plain) == cap.zero_shot_prompts("birads", plain)[1]


def test_density_prompts():
    prompts = cap.zero_shot_prompts("density", _record(), prefix="patient_image")
    assert len(prompts) == 4 == len(cap.CLASS_NAMES["density"])
    for label, prompt in enumerate(prompts):
        lines = prompt.split("\n")
        assert lines[0].startswith("Patient info:") and lines[1].startswith("Image info:")
        assert f"The breast is {cap.DENSITY_DESC[label + 1]}." in lines[2]
        assert (cap.DENSE_NOTE in prompt) == (label >= 2)
        assert "Findings" not in prompt and "Procedure" not in prompt


def test_prefix_variants():
    rec = _record()
    official = cap.zero_shot_prompts("birads", rec, prefix="official")[4]
    patient = cap.zero_shot_prompts("birads", rec, prefix="patient_image")[4]
    bare = cap.zero_shot_prompts("birads", prefix="none")[4]
    assert official.startswith("Procedure reported:")
    assert patient.startswith("Patient info:") and "Procedure" not in patient
    assert bare.startswith("Findings:")
    assert official.endswith(bare) and patient.endswith(bare)
    assert cap.count_sentences(official) == cap.count_sentences(bare) + 4
    assert "56 years old" in official  # never masked
    with pytest.raises(ValueError, match="record"):
        cap.zero_shot_prompts("birads")
    with pytest.raises(ValueError, match="official, patient_image, none"):
        cap.zero_shot_prompts("birads", rec, prefix="meta")
    with pytest.raises(ValueError, match="birads, density, cancer"):
        cap.zero_shot_prompts("mass", rec)


def test_cancer_prompts_have_no_prefix():
    prompts = cap.zero_shot_prompts("cancer")
    assert prompts == cap.zero_shot_prompts("cancer", _record(), prefix="official")
    assert len(prompts) == 2 == len(cap.CLASS_NAMES["cancer"])
    assert prompts[0] == (
        "Findings: The mammogram shows that Cancer negative: overall healthy or just benign finding.\n"
        "Impressions: BI-RADS Category N or B: Negative or Benign.\n"
        "Overall Assessment: Negative or Benign.")
    assert prompts[1].startswith("Findings: The mammogram shows that Cancer positive:")
    assert "Patient info" not in prompts[1] and "Procedure" not in prompts[1]
    assert all(cap.count_sentences(p) == 3 for p in prompts)


def test_sentence_count_matches_tokenizer_seps(tmp_path):
    """count_sentences is the number of SEP tokens the caption tokenizer emits."""
    pytest.importorskip("transformers")
    from mama_jax.input import tokenizer as tk

    texts = [cap.build_caption(_record(), style=s) for s in cap.STYLES]
    texts += cap.zero_shot_prompts("birads", _record()) + cap.zero_shot_prompts("cancer")
    tok = tk.load_tokenizer(tk.build_tiny_tokenizer(str(tmp_path / "tok"), texts))
    for text in texts:
        enc = tk.encode_caption(tok, text, max_length=512)
        assert not enc.truncated
        assert int((enc.input_ids == tok.sep_id).sum()) == cap.count_sentences(text), text


def test_sentence_kind_names_every_segment_of_the_structured_caption():
    record = {"procedure": "MG Diagnostic Mammo", "reason": "lump", "age": 61, "race": "Asian",
              "ethnicity": "", "image_type": "2D", "laterality": "L", "view": "CC", "density": 3,
              "birads": 4, "mass_shape": "irregular", "mass_density": "high density",
              "calc_type": "amorphous", "calc_distribution": "grouped"}
    caption = cap.build_caption(record, style="structured")
    sentences = [s.strip() for s in caption.replace("\n", " ").replace(";", ".").split(".")[:-1]]
    kinds = [cap.sentence_kind(s) for s in sentences]
    assert kinds == ["Procedure reported", "Reason for procedure", "Patient info", "Image info",
                     "Breast composition", "This may lower the sensitivity of mammography",
                     "Findings", "The mass", "Calcification", "Impressions", "Overall Assessment"]
    assert cap.sentence_kind("  Something else entirely here ") == "Something else entirely"
