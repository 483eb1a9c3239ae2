"""The label vocabulary: names, indices, text prompts and intensity presets, read from one JSON file.

Everything that needs label names (the bundle's metadata, the inference output, the MONAI Label tasks and the
trainer) reads them from here; ``configs/vocabulary.json`` is the single source.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_VOCABULARY_PATH", "LabelEntry", "ResolvedPrompt", "Vocabulary", "load_vocabulary"]

DEFAULT_VOCABULARY_PATH = Path(__file__).resolve().parents[2] / "configs" / "vocabulary.json"
MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class LabelEntry:
    index: int
    name: str
    prompts: tuple[str, ...]
    modalities: tuple[str, ...]
    presets: dict[str, str]  # modality -> preset name


@dataclass(frozen=True)
class ResolvedPrompt:
    """What a request's text means: a vocabulary label (``known``) or free text passed to the model as is."""

    name: str
    index: int | None
    prompts: tuple[str, ...]
    known: bool


def _normalise(text: str) -> str:
    return re.sub(r"[\s_]+", " ", text.strip().lower())


class Vocabulary:
    """Lookup by index, name or synonym (case, spaces and underscores ignored)."""

    def __init__(self, entries: list[LabelEntry], presets: dict[str, dict[str, Any]], defaults: dict[str, str]) -> None:
        self.entries = entries
        self.presets = presets
        self.defaults = defaults
        self.by_index = {e.index: e for e in entries}
        self._by_text: dict[str, LabelEntry] = {}
        for entry in entries:
            for text in (entry.name, *entry.prompts):
                self._by_text.setdefault(_normalise(text), entry)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __iter__(self):  # noqa: ANN204 - iterator of LabelEntry
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def resolve(self, query: str | int) -> ResolvedPrompt:
        """A label index, name or synonym -> its entry; other text -> free text (``known=False``)."""
        if isinstance(query, bool) or not isinstance(query, (str, int)):
            raise ValueError(f"A label is a name, a synonym or an index, got {query!r}")
        text = str(query).strip()
        if not text:
            raise ValueError("Empty label name")
        if text.isdigit():
            index = int(text)
            if index not in self.by_index:
                raise ValueError(f"Label index {index} is not in the vocabulary (indices 1..{max(self.by_index)})")
            entry = self.by_index[index]
        else:
            entry = self._by_text.get(_normalise(text))
        if entry is None:
            return ResolvedPrompt(name=text, index=None, prompts=(text,), known=False)
        return ResolvedPrompt(name=entry.name, index=entry.index, prompts=entry.prompts, known=True)

    def preset_for(self, name: str, modality: str) -> dict[str, Any]:
        """The intensity preset for a label in a modality (the modality's default when the label has none)."""
        entry = self._by_text.get(_normalise(name))
        preset = entry.presets.get(modality) if entry else None
        return self.presets[preset] if preset else self.default_preset(modality)

    def default_preset(self, modality: str) -> dict[str, Any]:
        if modality not in self.defaults:
            raise ValueError(f"Unknown modality {modality!r}; choose one of {sorted(self.defaults)}")
        return self.presets[self.defaults[modality]]

    def channel_def(self) -> dict[str, str]:
        """``{"0": "background", "1": "liver", ...}`` for the bundle's metadata."""
        return {"0": "background", **{str(e.index): e.name for e in self.entries}}


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and validate a vocabulary file; problems raise ``ValueError`` naming the file."""
    path = Path(path) if path else DEFAULT_VOCABULARY_PATH
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read label vocabulary {path}: {error}") from error
    presets = data.get("presets", {})
    defaults = data.get("default_presets", {})
    for modality, name in defaults.items():
        if name not in presets:
            raise ValueError(f"{path}: default preset {name!r} for {modality} is not defined in 'presets'")
    entries: list[LabelEntry] = []
    for raw in data.get("labels", []):
        entries.append(_entry(raw, presets, path))
    if not entries:
        raise ValueError(f"{path} defines no labels")
    for attribute in ("index", "name"):
        values = [getattr(e, attribute) for e in entries]
        duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
        if duplicates:
            raise ValueError(f"{path}: duplicate label {attribute}s {duplicates}")
    return Vocabulary(entries, presets, defaults)


def _entry(raw: dict[str, Any], presets: dict[str, Any], path: Path) -> LabelEntry:
    try:
        index, name, prompts = int(raw["index"]), _normalise(raw["name"]), tuple(raw["prompts"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: label entry {raw!r} needs an integer 'index', a 'name' and 'prompts'") from error
    if index < 1:
        raise ValueError(f"{path}: label {name!r} has index {index}; indices start at 1 (0 is background)")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path}: label {name!r} needs at least one non-empty text prompt")
    preset = dict(raw.get("preset", {}))
    for modality, preset_name in preset.items():
        if modality not in MODALITIES or preset_name not in presets:
            raise ValueError(f"{path}: label {name!r} uses unknown preset {preset_name!r} for {modality!r}")
    return LabelEntry(index, name, prompts, tuple(raw.get("modalities", MODALITIES)), preset)
