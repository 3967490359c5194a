"""Captions from records: MaMA's structured report, meta masking, zero-shot prompts.

Wording follows spec/reference_behaviour.md §3.1 (segments, BI-RADS and density maps),
§3.2 (masking of six meta fields) and §4.1 (zero-shot prompts). Every caption is one
segment per line; the tokenizer turns newlines into spaces and every "." and ";" into
a SEP token, so each sentence here ends with exactly one of them and record values are
cleaned of stray "." / ";" (they would add sentence ends inside a sentence).

Pure Python + numpy: records straight from TFDS (bytes text, numpy ints) are accepted.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

STYLES = ("structured", "structured_nomask", "tabular", "label_only", "one_finding")
META_FIELDS = ("age", "race", "ethnicity", "image_type", "side", "view")
TASKS = ("birads", "density", "cancer")
PREFIXES = ("official", "patient_image", "none")
UNKNOWN = "unknown"
SENTENCE_ENDS = (".", ";")

# record key -> kind; `laterality` is exposed as `side` (the name masking uses).
_TEXT_KEYS = ("procedure", "reason", "race", "ethnicity", "image_type", "laterality", "view",
              "mass_shape", "mass_density", "calc_type", "calc_distribution")
_INT_KEYS = ("age", "density", "birads")
RECORD_KEYS = _TEXT_KEYS + _INT_KEYS

SIDE_WORDS = {"L": "left", "R": "right", "B": "bilateral"}

# BI-RADS class k (letters A N B P S M K): impression desc, finding sentence, overall word.
BIRADS_DESC = (
    "additional imaging required",
    "negative",
    "benign finding",
    "probably benign finding",
    "suspicious abnormality",
    "highly suggestive of malignancy",
    "known biopsy-proven malignancy",
)
BIRADS_FINDING = (
    "an additional imaging is recommended",
    "no significant masses, calcification, or other abnormalities are present",
    "a benign finding is present",
    "a probably benign finding is present",
    "a suspicious abnormality is present",
    "a highly suggestive of malignancy is present, a biopsy is recommended",
    "a known biopsy-proven malignant mass is present",
)
BIRADS_ASSESSMENT = (
    "Additional imaging is recommended",
    "Negative",
    "Benign",
    "Probably benign",
    "Suspicious abnormality",
    "Highly suggestive of malignancy",
    "Known biopsy-proven malignancy",
)
# tissueden value -> description; 5 (male) exists in the legend but is no density class.
DENSITY_DESC = {
    1: "almost entirely fat",
    2: "scattered fibroglandular densities",
    3: "heterogeneously dense",
    4: "extremely dense",
    5: "normal male dense",
}
DENSITY_CLASSES = (1, 2, 3, 4)  # density task label = value - 1
DENSE_NOTE = "This may lower the sensitivity of mammography."
# Opening of the sentence that describes a mass (written by _findings_line).
MASS_SENTENCE = "The mass"
DENSE_VALUES = (3, 4)

# RSNA cancer prompts (§4.1): finding, impression category, impression/assessment desc.
CANCER_PROMPT_PARTS = (
    ("Cancer negative: overall healthy or just benign finding", "N or B", "Negative or Benign"),
    ("Cancer positive: screening image with known biopsy-proven malignancy or suspicious "
     "abnormality found", "A",
     "Additional imaging required with biopsy-proven malignancy or suspicious abnormality found"),
)

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "birads": BIRADS_DESC,
    "density": tuple(DENSITY_DESC[v] for v in DENSITY_CLASSES),
    "cancer": ("cancer negative", "cancer positive"),
}

# Most sentence ends a caption of each style can have (all segments present; values are
# cleaned of "." and ";"): for sizing the per-caption sentence arrays.
MAX_SENTENCES = {"structured": 11, "structured_nomask": 11, "tabular": 14, "label_only": 2,
                 "one_finding": 8}


def count_sentences(caption: str) -> int:
    """Number of sentence ends ("." and ";"), i.e. SEP tokens the tokenizer will emit."""
    return sum(caption.count(mark) for mark in SENTENCE_ENDS)


# ----------------------------------------------------------------------------- fields

def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise ValueError(f"shape {value.shape}, expected a scalar")
        value = value.item()
    return value


def _as_text(value: Any, key: str) -> str:
    value = _scalar(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"record field {key!r} is not UTF-8: {err}") from err
    if not isinstance(value, str):
        raise ValueError(f"record field {key!r} must be text (str/bytes), got {type(value).__name__}")
    return value.strip()


def _as_int(value: Any, key: str) -> int:
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"record field {key!r} must be an integer, got bool")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"record field {key!r} must be an integer, got {value!r}")


def _clean(text: str) -> str:
    """A record value inside a sentence: no sentence ends, no line breaks."""
    for mark in SENTENCE_ENDS + ("\n", "\r"):
        text = text.replace(mark, " ")
    return re.sub(r"\s+", " ", text).strip()


def record_to_fields(record: Mapping[str, Any]) -> dict:
    """The caption fields of a record as str / int ("" and -1 = unknown).

    Keys: procedure, reason, age, race, ethnicity, image_type, side (L/R/B/""), view,
    density, birads, mass_shape, mass_density, calc_type, calc_distribution.
    """
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise KeyError(f"record has no field(s) {', '.join(missing)} (needed for captions)")
    out: dict[str, Any] = {}
    for key in _TEXT_KEYS:
        out["side" if key == "laterality" else key] = _clean(_as_text(record[key], key))
    for key in _INT_KEYS:
        out[key] = _as_int(record[key], key)
    out["side"] = out["side"].upper()
    if out["side"] not in ("", *SIDE_WORDS):
        raise ValueError(f"record field 'laterality' is {out['side']!r}, expected L/R/B or ''")
    if out["density"] != -1 and out["density"] not in DENSITY_DESC:
        raise ValueError(f"record field 'density' is {out['density']}, expected 1..5 or -1")
    if out["birads"] != -1 and not 0 <= out["birads"] < len(BIRADS_DESC):
        raise ValueError(f"record field 'birads' is {out['birads']}, expected 0..6 or -1")
    if out["age"] < 0:
        out["age"] = -1
    return out


def meta_words(fields: Mapping[str, Any]) -> dict:
    """The six meta fields as the words the caption shows ("unknown" when missing)."""
    return {
        "age": str(fields["age"]) if fields["age"] >= 0 else UNKNOWN,
        "race": fields["race"] or UNKNOWN,
        "ethnicity": fields["ethnicity"] or UNKNOWN,
        "image_type": fields["image_type"] or UNKNOWN,
        "side": SIDE_WORDS.get(fields["side"], UNKNOWN),
        "view": fields["view"] or UNKNOWN,
    }


def mask_meta(words: Mapping[str, str], mask_prob: float,
              rng: np.random.Generator | None) -> dict:
    """Each of META_FIELDS independently -> "unknown" with probability mask_prob (§3.2).

    Draws exactly len(META_FIELDS) uniforms from rng when mask_prob > 0, none otherwise.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    out = dict(words)
    if mask_prob == 0.0:
        return out
    if rng is None:
        raise ValueError("mask_prob > 0 needs an rng (e.g. np.random.default_rng(seed))")
    hits = rng.random(len(META_FIELDS)) < mask_prob
    for name, hit in zip(META_FIELDS, hits):
        if hit:
            out[name] = UNKNOWN
    return out


# ----------------------------------------------------------------------------- segments

def _procedure_lines(fields: Mapping[str, Any]) -> list[str]:
    lines = []
    if fields["procedure"]:
        lines.append(f"Procedure reported: {fields['procedure']};")
    if fields["reason"]:
        lines.append(f"Reason for procedure: {fields['reason']};")
    return lines


def _meta_lines(words: Mapping[str, str]) -> list[str]:
    return [
        f"Patient info: This patient is {words['race']}, {words['ethnicity']}, "
        f"and {words['age']} years old.",
        f"Image info: This is a {words['image_type']} full-field digital mammogram of the "
        f"{words['side']} breast with {words['view']} view.",
    ]


def _composition_line(density: int) -> str:
    line = f"Breast composition: The breast is {DENSITY_DESC[density]}."
    return f"{line} {DENSE_NOTE}" if density in DENSE_VALUES else line


def _lesion_sentences(fields: Mapping[str, Any]) -> list[str]:
    out = []
    # The official template adds each only when both of its codes decode.
    if fields["mass_shape"] and fields["mass_density"]:
        out.append(f"{MASS_SENTENCE} is {fields['mass_shape']} and {fields['mass_density']}.")
    if fields["calc_type"] and fields["calc_distribution"]:
        out.append(f"A {fields['calc_distribution']} {fields['calc_type']} calcification is present.")
    return out


def _findings_line(k: int, fields: Mapping[str, Any] | None = None) -> str:
    lesions = [] if fields is None else _lesion_sentences(fields)
    return " ".join([f"Findings: The mammogram shows that {BIRADS_FINDING[k]}.", *lesions])


def _impression_lines(k: int) -> list[str]:
    return [f"Impressions: BI-RADS Category {k}: {BIRADS_DESC[k]}.",
            f"Overall Assessment: {BIRADS_ASSESSMENT[k]}."]


def _structured(fields: Mapping[str, Any], words: Mapping[str, str]) -> list[str]:
    lines = _procedure_lines(fields) + _meta_lines(words)
    if fields["density"] != -1:
        lines.append(_composition_line(fields["density"]))
    if fields["birads"] != -1:
        lines.append(_findings_line(fields["birads"], fields))
        lines += _impression_lines(fields["birads"])
    return lines


def _one_finding(fields: Mapping[str, Any], words: Mapping[str, str]) -> list[str]:
    """The structured report with one finding in place of the BI-RADS block: the mass and
    calcification sentences where the record has them, else the BI-RADS finding sentence;
    no impression or assessment lines. A lesion is then named by one sentence only, so the
    local loss has one sentence to give its patches to (experiments/sla_localisation.py)."""
    lines = _procedure_lines(fields) + _meta_lines(words)
    if fields["density"] != -1:
        lines.append(_composition_line(fields["density"]))
    lesions = _lesion_sentences(fields)
    if lesions:
        lines.append(" ".join(lesions))
    elif fields["birads"] != -1:
        lines.append(_findings_line(fields["birads"]))
    return lines


def _tabular(fields: Mapping[str, Any], words: Mapping[str, str]) -> list[str]:
    pairs = [("procedure", fields["procedure"]), ("reason", fields["reason"])]
    pairs = [(k, v) for k, v in pairs if v]
    pairs += [("age", words["age"]), ("race", words["race"]),
              ("ethnicity", words["ethnicity"]), ("image type", words["image_type"]),
              ("side", words["side"]), ("view", words["view"])]
    if fields["density"] != -1:
        pairs.append(("density", str(fields["density"])))
    if fields["mass_shape"] and fields["mass_density"]:
        pairs += [("mass shape", fields["mass_shape"]), ("mass density", fields["mass_density"])]
    if fields["calc_type"] and fields["calc_distribution"]:
        pairs += [("calcification type", fields["calc_type"]),
                  ("calcification distribution", fields["calc_distribution"])]
    if fields["birads"] != -1:
        pairs.append(("birads", str(fields["birads"])))
    return [f"{key}: {value};" for key, value in pairs]


def _label_only(fields: Mapping[str, Any]) -> list[str]:
    parts = []
    if fields["birads"] != -1:
        k = fields["birads"]
        parts.append(f"BI-RADS Category {k}: {BIRADS_DESC[k]}.")
    if fields["density"] != -1:
        parts.append(f"The breast is {DENSITY_DESC[fields['density']]}.")
    if not parts:
        raise ValueError("label_only caption needs 'birads' or 'density'; the record has neither")
    return [" ".join(parts)]


def build_caption(record: Mapping[str, Any], *, style: str = "structured",
                  mask_prob: float = 0.0, rng: np.random.Generator | None = None) -> str:
    """One caption for a record; segments on separate lines.

    structured         §3.1 report; META_FIELDS masked with mask_prob (training: 0.8).
    structured_nomask  the same report, never masked (Table 6 "No Meta Mask").
    tabular            the same information as "key: value;" lines, masked like structured
                       (Table 6 "Tabular-style"); density and BI-RADS as their numbers.
    label_only         CLIP style (Table 6): only the class labels, in the structured
                       wording, "BI-RADS Category k: desc. The breast is desc." (whichever
                       is known), so its sentences match the zero-shot prompts' wording.
    one_finding        structured, masked alike, with one finding sentence in place of the
                       findings / impressions / assessment block (not in the paper; for
                       the localisation experiment): "The mass is ..." (and the
                       calcification sentence) where the record has a lesion, else the
                       BI-RADS finding ("Findings: The mammogram shows that ...").
    """
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; choose one of {', '.join(STYLES)}")
    fields = record_to_fields(record)
    if style == "label_only":
        return "\n".join(_label_only(fields))
    words = meta_words(fields)
    if style != "structured_nomask":
        words = mask_meta(words, mask_prob, rng)
    build = {"tabular": _tabular, "one_finding": _one_finding}.get(style, _structured)
    lines = build(fields, words)
    return "\n".join(lines)


# Openings of the structured caption's sentences, for naming a sentence's kind.
SENTENCE_KINDS = ("Procedure reported", "Reason for procedure", "Patient info", "Image info",
                  "Breast composition", DENSE_NOTE.rstrip("."), "Findings", MASS_SENTENCE,
                  "Impressions", "Overall Assessment")


def sentence_kind(sentence: str) -> str:
    """Which segment of the structured caption a sentence is (its opening words), e.g.
    "The mass" for "The mass is oval and equal density"; other text: its first 3 words."""
    sentence = sentence.strip()
    for kind in SENTENCE_KINDS:
        if sentence.startswith(kind):
            return kind
    if sentence.rstrip(".").endswith("calcification is present"):
        return "Calcification"
    return " ".join(sentence.split()[:3])


# ----------------------------------------------------------------------------- zero-shot

def _prefix_lines(record: Mapping[str, Any] | None, prefix: str) -> list[str]:
    if prefix not in PREFIXES:
        raise ValueError(f"unknown zero-shot prefix {prefix!r}; choose one of {', '.join(PREFIXES)}")
    if prefix == "none":
        return []
    if record is None:
        raise ValueError(f"zero-shot prefix {prefix!r} needs the test image's record")
    fields = record_to_fields(record)
    lines = _meta_lines(meta_words(fields))  # unmasked (§4.1)
    return _procedure_lines(fields) + lines if prefix == "official" else lines


def zero_shot_prompts(task: str, record: Mapping[str, Any] | None = None, *,
                      prefix: str = "official") -> list[str]:
    """Class prompts for zero-shot classification, index = class label (§4.1).

    birads   7 prompts (0..6): prefix + findings, impressions, overall assessment.
    density  4 prompts (density 1..4): prefix + breast composition.
    cancer   2 RSNA prompts; never prefixed (prefix and record are ignored). Each part
             ends with "." (the official strings leave some ends off; punctuation there is
             unconfirmed) so the prompt ends in a sentence end like every training caption.
    prefix   official = the record's own unmasked procedure, reason, patient and image
             info (D17); patient_image = patient and image info; none = no prefix.
    """
    if task not in TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "cancer":
        return ["\n".join([f"Findings: The mammogram shows that {finding}.",
                           f"Impressions: BI-RADS Category {category}: {desc}.",
                           f"Overall Assessment: {desc}."])
                for finding, category, desc in CANCER_PROMPT_PARTS]
    head = _prefix_lines(record, prefix)
    if task == "birads":
        bodies = [[_findings_line(k)] + _impression_lines(k) for k in range(len(BIRADS_DESC))]
    else:
        bodies = [[_composition_line(v)] for v in DENSITY_CLASSES]
    return ["\n".join(head + body) for body in bodies]
