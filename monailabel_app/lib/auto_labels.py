"""The labels "Auto" segments when a client names none, chosen from the series' modality and body part.

OHIF's Auto button and an empty ``label_prompt`` name no label; segmenting the whole vocabulary (63 labels, one
after another) is slow and fills the viewer with structures the scan does not show. ``configs/auto_labels.json``
lists a short set per modality and DICOM BodyPartExamined; ``--conf labels`` (the site's own choice) overrides it.
The modality and body part come from the series' DICOM tags (:func:`lib.dicom_source.dicom_tags`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .bundle_path import REPO_ROOT

logger = logging.getLogger(__name__)

AUTO_LABELS_PATH = REPO_ROOT / "configs" / "auto_labels.json"


@dataclass(frozen=True)
class AutoLabels:
    """Label sets by modality, then body part (``default`` when missing or unlisted); ``fallback`` otherwise."""

    modalities: dict[str, dict[str, list[str]]]
    fallback: list[str]

    @classmethod
    def load(cls, path: Path = AUTO_LABELS_PATH) -> AutoLabels:
        try:
            data = json.loads(path.read_text())
            sets = {m.upper(): {_part(p): list(v) for p, v in parts.items()} for m, parts in data["modalities"].items()}
            fallback = list(data["fallback"])
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(f"{path}: not a valid auto label file ({error!r})") from error
        if not fallback or any("default" not in parts for parts in sets.values()):
            raise ValueError(f"{path}: every modality needs a 'default' set, and 'fallback' must not be empty")
        return cls(sets, fallback)

    def names(self, modality: str, body_part: str = "") -> list[str]:
        parts = self.modalities.get(modality.upper())
        if parts is None:
            return list(self.fallback)
        return list(parts.get(_part(body_part), parts["default"]))

    def choose(self, offered: list[str], modality: str, body_part: str = "", all_offered: bool = False) -> list[str]:
        """The set for this series among the ``offered`` labels; every offered one when the site chose them."""
        if all_offered:
            return list(offered)
        wanted = [name for name in self.names(modality, body_part) if name in offered]
        chosen = wanted or list(offered)
        logger.info("Auto without labels on a %s %s series: %s", modality or "?", body_part or "", chosen)
        return chosen


def _part(body_part: str) -> str:
    """BodyPartExamined is upper case in DICOM; ``default`` is the file's own key."""
    return body_part if body_part == "default" else body_part.strip().upper()
