"""The label vocabulary: names, indices, text prompts and intensity presets, read from one JSON file.

Everything that needs label names (the bundle's metadata, the inference output, the MONAI Label tasks and the
trainer) reads them from here, so the bundle's ``configs/vocabulary.json`` is the single source and a bad file
fails at load time with the file and the problem named, not mid-inference.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .intensity import check_preset

__all__ = [
    "DEFAULT_VOCABULARY_PATH",
    "MODALITIES",
    "LabelEntry",
    "ResolvedPrompt",
    "SnomedCoding",
    "Vocabulary",
    "load_vocabulary",
    "lookup_key",
]

logger = logging.getLogger(__name__)

DEFAULT_VOCABULARY_PATH = Path(__file__).resolve().parents[1] / "configs" / "vocabulary.json"
MODALITIES = ("CT", "MR")
_INDEX = re.compile(r"[+-]?[0-9]+")
_SCTID = re.compile(r"[1-9][0-9]{5,17}")  # a SNOMED CT identifier: 6 to 18 digits


@dataclass(frozen=True)
class SnomedCoding:
    """What a DICOM SEG segment says a label is: SNOMED CT (code, meaning) pairs for the segmented property's
    category and type, and a laterality modifier where the type does not carry it (left/right kidney)."""

    category: tuple[str, str]
    type: tuple[str, str]
    modifier: tuple[str, str] | None = None


@dataclass(frozen=True)
class LabelEntry:
    """One label; ``prompts[0]`` is the canonical text the model sees, ``aliases`` only resolve to the label."""

    index: int
    name: str
    prompts: tuple[str, ...]
    modalities: tuple[str, ...]
    presets: dict[str, str] = field(hash=False)  # modality -> preset name
    aliases: tuple[str, ...] = ()
    snomed: SnomedCoding | None = None  # None for labels SNOMED CT has no code for


@dataclass(frozen=True)
class ResolvedPrompt:
    """What a request's text means: a vocabulary label (``known``) or free text passed to the model as is."""

    name: str
    index: int | None
    prompts: tuple[str, ...]
    known: bool


def lookup_key(text: str) -> str:
    """The form texts are compared in: case, repeated whitespace and underscores (``left_kidney``) do not matter."""
    return " ".join(text.replace("_", " ").lower().split())


class Vocabulary:
    """Labels looked up by index, name, prompt or alias; presets by label and modality."""

    def __init__(
        self,
        entries: list[LabelEntry],
        presets: dict[str, dict[str, Any]],
        defaults: dict[str, str],
        path: Path | None = None,
    ) -> None:
        self.entries = sorted(entries, key=lambda e: e.index)
        self.presets = presets
        self.defaults = defaults
        self.path = path
        self.by_index = {e.index: e for e in self.entries}
        self._by_text = _text_index(self.entries, path)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __iter__(self) -> Iterator[LabelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def resolve(self, query: str | int) -> ResolvedPrompt:
        """A label index (int or digits), name, prompt or alias -> its label; other text -> free text (not known)."""
        if isinstance(query, numbers.Integral) and not isinstance(query, bool):
            return _resolved(self._at_index(int(query)))
        if not isinstance(query, str):
            raise ValueError(f"A label is a name, a synonym or an index, got {query!r}")
        text = " ".join(query.split())
        if not text:
            raise ValueError("Empty label query: give a label name, a synonym or an index")
        if _INDEX.fullmatch(text):
            return _resolved(self._at_index(int(text)))
        entry = self._by_text.get(lookup_key(text))
        if entry is None:
            return ResolvedPrompt(name=text, index=None, prompts=(text,), known=False)
        return _resolved(entry)

    def preset_for(self, label: str | int | LabelEntry | ResolvedPrompt, modality: str) -> dict[str, Any]:
        """The intensity preset for ``label`` in ``modality``: the label's own, else the modality's default."""
        modality = _modality(modality)
        entry = self._entry_for(label)
        name = entry.presets.get(modality) if entry else None
        return dict(self.presets[name]) if name else self.default_preset(modality)

    def default_preset(self, modality: str) -> dict[str, Any]:
        """The preset for free text and for labels without one for ``modality``."""
        return dict(self.presets[self.defaults[_modality(modality)]])

    def channel_def(self) -> dict[str, str]:
        """``{"0": "background", "1": "liver", ...}`` for the bundle's metadata."""
        return {"0": "background", **{str(e.index): e.name for e in self.entries}}

    def _at_index(self, index: int) -> LabelEntry:
        if index not in self.by_index:
            source = f" {self.path}" if self.path else ""
            raise ValueError(
                f"Label index {index} is not in the vocabulary{source} (indices {min(self.by_index)} to "
                f"{max(self.by_index)}); give a listed index or a label name"
            )
        return self.by_index[index]

    def _entry_for(self, label: str | int | LabelEntry | ResolvedPrompt) -> LabelEntry | None:
        if isinstance(label, LabelEntry):
            return label
        resolved = label if isinstance(label, ResolvedPrompt) else self.resolve(label)
        return self.by_index.get(resolved.index) if resolved.known else None


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and validate a vocabulary file (default: the repository's); problems raise ``ValueError`` naming it."""
    path = Path(path) if path is not None else DEFAULT_VOCABULARY_PATH
    data = _read_object(path)
    presets = _presets(data, path)
    defaults = _defaults(data, presets, path)
    raw_labels = data.get("labels")
    if not isinstance(raw_labels, list) or not raw_labels:
        raise _invalid(path, "'labels' must be a non-empty list of label objects")
    entries = [_entry(raw, presets, path) for raw in raw_labels]
    for attribute, plural in (("index", "indices"), ("name", "names")):
        values = [getattr(e, attribute) for e in entries]
        duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
        if duplicates:
            raise _invalid(path, f"duplicate label {plural} {duplicates}")
    vocabulary = Vocabulary(entries, presets, defaults, path)
    logger.debug("Loaded %d labels from %s", len(vocabulary), path)
    return vocabulary


def _invalid(path: Path | None, problem: str) -> ValueError:
    return ValueError(f"Label vocabulary {path}: {problem}")


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(path, f"cannot be read as JSON ({error})") from error
    if not isinstance(data, dict):
        raise _invalid(path, f"the top level must be an object, got {type(data).__name__}")
    return data


def _presets(data: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    presets = data.get("presets")
    if not isinstance(presets, dict) or not presets:
        raise _invalid(path, "'presets' must be a non-empty object of named intensity presets")
    for name, preset in presets.items():
        try:
            check_preset(preset)
        except ValueError as error:
            raise _invalid(path, f"preset {name!r}: {error}") from error
    return presets


def _defaults(data: dict[str, Any], presets: dict[str, Any], path: Path) -> dict[str, str]:
    defaults = data.get("default_presets")
    if not isinstance(defaults, dict) or set(defaults) != set(MODALITIES):
        raise _invalid(path, f"'default_presets' must name one preset for each of {list(MODALITIES)}")
    for modality, name in defaults.items():
        if name not in presets:
            raise _invalid(path, f"default preset {name!r} for {modality} is not defined in 'presets'")
    return defaults


def _entry(raw: Any, presets: dict[str, Any], path: Path) -> LabelEntry:
    if not isinstance(raw, dict):
        raise _invalid(path, f"a label must be an object, got {raw!r}")
    index, name = raw.get("index"), raw.get("name")
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise _invalid(path, f"label {name!r} needs an integer 'index' of at least 1 (0 is background), got {index!r}")
    if not isinstance(name, str) or not name or name != lookup_key(name):
        raise _invalid(path, f"label {index}: 'name' must be lowercase words separated by single spaces, got {name!r}")
    prompts = _texts(raw.get("prompts"), f"label {name!r} 'prompts'", path)
    if not prompts:
        raise _invalid(path, f"label {name!r} needs at least one text prompt")
    aliases = _texts(raw.get("aliases", []), f"label {name!r} 'aliases'", path)
    modalities = tuple(raw.get("modalities", MODALITIES))
    if not modalities or not set(modalities) <= set(MODALITIES):
        raise _invalid(path, f"label {name!r} has modalities {list(modalities)}; use some of {list(MODALITIES)}")
    preset = raw.get("preset", {})
    if not isinstance(preset, dict):
        raise _invalid(path, f"label {name!r}: 'preset' must map modalities to preset names")
    for modality, preset_name in preset.items():
        if modality not in modalities:
            raise _invalid(path, f"label {name!r} has a preset for {modality!r}, which is not among its modalities")
        if preset_name not in presets:
            raise _invalid(path, f"label {name!r} uses unknown preset {preset_name!r} for {modality}")
    snomed = _snomed(raw["snomed"], name, path) if "snomed" in raw else None
    return LabelEntry(index, name, prompts, modalities, dict(preset), aliases, snomed)


def _snomed(raw: Any, name: str, path: Path) -> SnomedCoding:
    """``{"category": [code, meaning], "type": [...], "modifier": [...]}`` with well-formed SNOMED CT ids."""
    if (
        not isinstance(raw, dict)
        or not {"category", "type"} <= set(raw)
        or not set(raw) <= {"category", "type", "modifier"}
    ):
        raise _invalid(path, f"label {name!r}: 'snomed' needs 'category' and 'type' (and may have 'modifier')")
    pairs = {}
    for key, value in raw.items():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise _invalid(path, f"label {name!r}: snomed {key!r} must be [code, meaning], got {value!r}")
        if not _SCTID.fullmatch(value[0]) or not value[1].strip():
            raise _invalid(path, f"label {name!r}: snomed {key!r} {value!r} is not a SNOMED CT id and its meaning")
        pairs[key] = (value[0], value[1])
    return SnomedCoding(**pairs)


def _texts(value: Any, what: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise _invalid(path, f"{what} must be a list of non-empty strings, got {value!r}")
    return tuple(" ".join(t.split()) for t in value)


def _text_index(entries: list[LabelEntry], path: Path | None) -> dict[str, LabelEntry]:
    """Lookup key of every name, prompt and alias -> its label; a text naming two labels is an error."""
    index: dict[str, LabelEntry] = {}
    for entry in entries:
        for text in (entry.name, *entry.prompts, *entry.aliases):
            key = lookup_key(text)
            other = index.setdefault(key, entry)
            if other is not entry:
                raise _invalid(path, f"{text!r} names both {other.name!r} and {entry.name!r}")
    return index


def _resolved(entry: LabelEntry) -> ResolvedPrompt:
    return ResolvedPrompt(name=entry.name, index=entry.index, prompts=entry.prompts, known=True)


def _modality(modality: str) -> str:
    normalised = modality.upper() if isinstance(modality, str) else modality
    if normalised not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; use one of {list(MODALITIES)}")
    return normalised


def write_channel_def(metadata_path: str | Path, vocabulary: Vocabulary | None = None) -> None:
    """Refresh the bundle metadata's output ``channel_def`` from the vocabulary (run after editing the vocabulary).

    ``python -m scripts.vocabulary bundle/configs/metadata.json``
    """
    path = Path(metadata_path)
    meta = json.loads(path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = (vocabulary or load_vocabulary()).channel_def()
    path.write_text(json.dumps(meta, indent=4) + "\n")


if __name__ == "__main__":
    import sys

    write_channel_def(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
    )
