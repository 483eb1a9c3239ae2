"""The label vocabulary: the shipped file's contract, lookups, presets and the load-time checks of bad files."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scripts.intensity import apply_preset
from scripts.vocabulary import DEFAULT_VOCABULARY_PATH, LabelEntry, ResolvedPrompt, Vocabulary, load_vocabulary

REQUIRED = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
    "duodenum", "urinary bladder", "bladder", "prostate", "small bowel", "colon", "left lung", "right lung", "heart",
    "trachea", "vertebrae", "spine", "left femur", "right femur", "brain", "white matter", "gray matter", "cortex",
    "cerebrospinal fluid", "lateral ventricles", "thalamus", "hippocampus", "caudate", "putamen", "cerebellum",
    "brainstem", "liver tumor", "kidney tumor", "pancreatic tumor", "lung nodule", "brain tumor", "glioma",
    "peritumoral edema", "enhancing tumor", "necrotic core", "tumor", "lesion",
]  # fmt: skip

MINIMAL: dict[str, Any] = {
    "version": "1.0",
    "description": "test vocabulary",
    "default_presets": {"CT": "ct", "MR": "mr"},
    "presets": {
        "ct": {"type": "ct_window", "center": 40, "width": 400},
        "bone": {"type": "ct_window", "center": 400, "width": 1800},
        "mr": {"type": "percentile", "lower": 1, "upper": 99},
    },
    "labels": [
        {"index": 1, "name": "liver", "prompts": ["liver"], "preset": {"CT": "ct"}},
        {
            "index": 2,
            "name": "spine",
            "prompts": ["spine", "vertebrae"],
            "aliases": ["vertebra"],
            "preset": {"CT": "bone"},
        },
    ],
}


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return load_vocabulary()


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "vocabulary.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_shipped_file_contract(vocabulary: Vocabulary) -> None:
    assert DEFAULT_VOCABULARY_PATH.is_file() and vocabulary.path == DEFAULT_VOCABULARY_PATH
    assert [vocabulary.by_index[i].name for i in range(1, 7)] == [
        "liver", "spleen", "right kidney", "left kidney", "vertebrae", "aorta"
    ]  # fmt: skip  # the phantom's labels
    assert len(set(vocabulary.names)) == len(vocabulary) and all(n == n.lower() for n in vocabulary.names)
    assert all(isinstance(e.index, int) and e.index >= 1 for e in vocabulary)
    missing = [name for name in REQUIRED if not vocabulary.resolve(name).known]
    assert not missing, f"not in the vocabulary: {missing}"


def test_every_text_resolves_to_its_own_label(vocabulary: Vocabulary) -> None:
    for entry in vocabulary:
        for text in (entry.name, *entry.prompts, *entry.aliases, str(entry.index)):
            assert vocabulary.resolve(text).index == entry.index, text


def test_snomed_codes_are_dicoms_own(vocabulary: Vocabulary) -> None:
    """Every code and meaning is one of DICOM's SNOMED CT concepts (pydicom ships the standard's dictionary), so a
    PACS reading a segment's code finds the structure the label names, or its nearest broader concept."""
    from pydicom.sr import _concepts_dict

    meanings: dict[str, set[str]] = {}
    for concept in _concepts_dict.concepts["SCT"].values():
        for code, (meaning, _) in concept.items():
            meanings.setdefault(code, set()).add(meaning)
    coded = [e for e in vocabulary if e.snomed]
    assert len(coded) >= len(vocabulary) - 2  # the prostate zones have no code
    for entry in coded:
        for code, meaning in filter(None, (entry.snomed.category, entry.snomed.type, entry.snomed.modifier)):
            assert meaning in meanings.get(code, ()), (entry.name, code, meaning)
    liver, right_kidney = vocabulary.by_index[1].snomed, vocabulary.resolve("right kidney")
    assert liver.type == ("10200004", "Liver") and vocabulary.by_index[2].snomed.type == ("78961009", "Spleen")
    assert vocabulary.by_index[right_kidney.index].snomed.modifier == ("24028007", "Right")


def test_every_label_preset_applies(vocabulary: Vocabulary) -> None:
    volume = np.linspace(-1000, 1000, 1000, dtype=np.float32).reshape(10, 10, 10)
    for entry in vocabulary:
        for modality in entry.modalities:
            scaled = apply_preset(volume, vocabulary.preset_for(entry, modality))
            assert scaled.dtype == np.float32 and scaled.min() >= 0 and scaled.max() <= 1


def test_resolve_by_index_name_and_synonym(vocabulary: Vocabulary) -> None:
    liver = ResolvedPrompt(name="liver", index=1, prompts=("liver", "hepatic parenchyma"), known=True)
    for query in (1, np.int64(1), "1", " 1 ", "liver", "LIVER", "  Hepatic   Parenchyma "):
        assert vocabulary.resolve(query) == liver
    assert vocabulary.resolve("left_kidney").index == 4  # TotalSegmentator's names
    assert vocabulary.resolve("kidney_right").index == 3
    assert vocabulary.resolve("Portal_Vein_and_Splenic_Vein").index == 11
    assert vocabulary.resolve("kidney_right").prompts == ("right kidney",)  # aliases are never sent to the model


def test_unknown_text_is_free_text(vocabulary: Vocabulary) -> None:
    resolved = vocabulary.resolve("  the  round thing ")
    assert resolved == ResolvedPrompt(name="the round thing", index=None, prompts=("the round thing",), known=False)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "Empty label query"),
        ("   ", "Empty label query"),
        (999, r"Label index 999 is not in the vocabulary .*vocabulary.json \(indices 1 to \d+\)"),
        ("999", "Label index 999 is not in the vocabulary"),
        (0, "Label index 0 is not in the vocabulary"),
        ("-1", "Label index -1 is not in the vocabulary"),
        (None, "A label is a name, a synonym or an index, got None"),
        (True, "A label is a name, a synonym or an index, got True"),
        (1.5, "A label is a name, a synonym or an index, got 1.5"),
    ],
)
def test_resolve_rejects_bad_queries(vocabulary: Vocabulary, query: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vocabulary.resolve(query)


def test_presets(vocabulary: Vocabulary) -> None:
    bone = {"type": "ct_window", "center": 400, "width": 1800}
    assert vocabulary.preset_for("vertebrae", "CT") == bone
    assert vocabulary.preset_for(5, "ct") == bone
    assert vocabulary.preset_for(vocabulary.resolve("spine"), "CT") == bone
    assert vocabulary.preset_for(vocabulary.by_index[5], "CT") == bone
    mr = {"type": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}
    assert vocabulary.preset_for("vertebrae", "MR") == mr
    abdomen = {"type": "ct_window", "center": 40, "width": 400}
    assert vocabulary.preset_for("white matter", "CT") == abdomen  # an MR-only label falls back to the default
    assert vocabulary.preset_for("something new", "CT") == abdomen == vocabulary.default_preset("CT")
    assert vocabulary.default_preset("MR") == mr
    vocabulary.preset_for("liver", "CT")["width"] = 1  # callers get copies
    assert vocabulary.preset_for("liver", "CT") == abdomen


def test_preset_rejects_unknown_modality(vocabulary: Vocabulary) -> None:
    with pytest.raises(ValueError, match=r"Unknown modality 'PET'; use one of \['CT', 'MR'\]"):
        vocabulary.preset_for("liver", "PET")
    with pytest.raises(ValueError, match="Unknown modality 'US'"):
        vocabulary.default_preset("US")


def test_channel_def_and_iteration(vocabulary: Vocabulary) -> None:
    channels = vocabulary.channel_def()
    assert list(channels.items())[:3] == [("0", "background"), ("1", "liver"), ("2", "spleen")]
    assert len(channels) == len(vocabulary) + 1
    assert [e.name for e in vocabulary] == vocabulary.names
    assert all(isinstance(e, LabelEntry) for e in vocabulary)
    assert len({vocabulary.by_index[1], vocabulary.by_index[1]}) == 1  # entries are hashable


def test_minimal_file_loads(tmp_path: Path) -> None:
    vocabulary = load_vocabulary(_write(tmp_path, MINIMAL))
    assert vocabulary.names == ["liver", "spine"]
    assert vocabulary.by_index[1].modalities == ("CT", "MR")  # the default
    assert vocabulary.resolve("Vertebra").index == 2
    assert load_vocabulary(str(tmp_path / "vocabulary.json")).names == ["liver", "spine"]


def _mutated(change: str) -> Any:
    data = copy.deepcopy(MINIMAL)
    labels = data["labels"]
    if change == "duplicate index":
        labels[1]["index"] = 1
    elif change == "duplicate name":
        labels[1]["name"] = "liver"
    elif change == "no prompts":
        del labels[0]["prompts"]
    elif change == "empty prompts":
        labels[0]["prompts"] = []
    elif change == "blank prompt":
        labels[0]["prompts"] = ["liver", " "]
    elif change == "unknown preset":
        labels[0]["preset"] = {"CT": "ct_lungs"}
    elif change == "preset outside modalities":
        labels[0]["modalities"] = ["MR"]
    elif change == "unknown modality":
        labels[0]["modalities"] = ["PET"]
    elif change == "string index":
        labels[0]["index"] = "1"
    elif change == "zero index":
        labels[0]["index"] = 0
    elif change == "upper-case name":
        labels[0]["name"] = "Liver"
    elif change == "underscore name":
        labels[0]["name"] = "left_kidney"
    elif change == "ambiguous synonym":
        labels[1]["aliases"] = ["liver"]
    elif change == "label not an object":
        labels[0] = "liver"
    elif change == "no labels":
        data["labels"] = []
    elif change == "bad preset type":
        data["presets"]["mr"] = {"type": "zscore"}
    elif change == "bad window":
        data["presets"]["ct"]["width"] = 0
    elif change == "missing default":
        del data["default_presets"]["MR"]
    elif change == "undefined default":
        data["default_presets"]["MR"] = "t1"
    elif change == "top level list":
        data = [data]
    elif change == "snomed without type":
        labels[0]["snomed"] = {"category": ["123037004", "Anatomical Structure"]}
    elif change == "snomed bad id":
        labels[0]["snomed"] = {"category": ["123037004", "Anatomical Structure"], "type": ["liver", "Liver"]}
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("duplicate index", r"duplicate label indices \[1\]"),
        ("duplicate name", r"duplicate label names \['liver'\]"),
        ("no prompts", "label 'liver' 'prompts' must be a list of non-empty strings, got None"),
        ("empty prompts", "label 'liver' needs at least one text prompt"),
        ("blank prompt", "label 'liver' 'prompts' must be a list of non-empty strings"),
        ("unknown preset", "label 'liver' uses unknown preset 'ct_lungs' for CT"),
        ("preset outside modalities", "label 'liver' has a preset for 'CT', which is not among its modalities"),
        ("unknown modality", r"label 'liver' has modalities \['PET'\]; use some of \['CT', 'MR'\]"),
        ("string index", "label 'liver' needs an integer 'index' of at least 1 .0 is background., got '1'"),
        ("zero index", "label 'liver' needs an integer 'index' of at least 1"),
        ("upper-case name", "label 1: 'name' must be lowercase words separated by single spaces, got 'Liver'"),
        ("underscore name", "label 1: 'name' must be lowercase words separated by single spaces, got 'left_kidney'"),
        ("ambiguous synonym", "'liver' names both 'liver' and 'spine'"),
        ("label not an object", "a label must be an object, got 'liver'"),
        ("no labels", "'labels' must be a non-empty list of label objects"),
        ("bad preset type", "preset 'mr': Unknown intensity preset type 'zscore'"),
        ("bad window", "preset 'ct': CT window width must be positive, got 0"),
        ("missing default", r"'default_presets' must name one preset for each of \['CT', 'MR'\]"),
        ("undefined default", "default preset 't1' for MR is not defined in 'presets'"),
        ("top level list", "the top level must be an object, got list"),
        ("snomed without type", "label 'liver': 'snomed' needs 'category' and 'type'"),
        ("snomed bad id", r"label 'liver': snomed 'type' \['liver', 'Liver'\] is not a SNOMED CT id"),
    ],
)
def test_bad_files_are_rejected(tmp_path: Path, change: str, message: str) -> None:
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(ValueError, match=f"Label vocabulary {re.escape(str(path))}: {message}"):
        load_vocabulary(path)


def test_unreadable_files_are_rejected(tmp_path: Path) -> None:
    broken = _write(tmp_path, '{"labels": [')
    with pytest.raises(ValueError, match=f"Label vocabulary {re.escape(str(broken))}: cannot be read as JSON"):
        load_vocabulary(broken)
    missing = tmp_path / "absent.json"
    with pytest.raises(
        ValueError, match=f"Label vocabulary {re.escape(str(missing))}: cannot be read as JSON .*No such file"
    ):
        load_vocabulary(missing)
