"""The app's options (``monailabel start_server --conf key value``), parsed once into typed values."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .bundle_path import BUNDLE_ROOT, REPO_ROOT

RANDOM = "random"


@dataclass(frozen=True)
class AppSettings:
    """Every option a user can pass with ``--conf``; unknown keys are refused at start-up."""

    model_size: str = "base"
    checkpoint: str = str(BUNDLE_ROOT / "models" / "model.pt")  # or "random" (tests and demos)
    tracker_checkpoint: str = str(BUNDLE_ROOT / "models" / "sam3.pt")  # optional: clicks need a tracker
    device: str = "auto"
    vocabulary: str = str(REPO_ROOT / "configs" / "vocabulary.json")
    labels: str = ""  # comma-separated names the auto task offers; empty = the whole vocabulary
    scoring_labels: str = ""  # comma-separated names the uncertainty scoring uses; empty = scoring off
    plane: str = "axial"
    batch_size: int = 8
    score_threshold: float = 0.5
    max_empty_slices: int = 5
    cache_mb: int = 4096  # image encodings kept for repeated clicks (least recently used first out)
    model_dir: str = ""  # fine-tuning runs and published weights; empty = <app>/model, as MONAI Label apps do

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppSettings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(conf) - set(known))
        if unknown:
            raise ValueError(f"Unknown --conf options {unknown}; the app takes {sorted(known)}")
        values = {}
        for key, raw in conf.items():
            kind = known[key].type
            try:
                values[key] = int(raw) if kind == "int" else float(raw) if kind == "float" else str(raw)
            except ValueError as error:
                raise ValueError(f"--conf {key} expects a {kind}, got {raw!r}") from error
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.model_size not in ("base", "tiny"):
            raise ValueError(f"--conf model_size must be base or tiny, got {self.model_size!r}")
        if self.batch_size < 1 or self.cache_mb < 0 or not 0 <= self.score_threshold <= 1:
            raise ValueError("--conf batch_size must be >= 1, cache_mb >= 0 and score_threshold in [0, 1]")

    @property
    def random_weights(self) -> bool:
        return self.checkpoint == RANDOM

    def missing_weights(self) -> str | None:
        """Why the model cannot be served, or None when its weights are in place."""
        if self.random_weights or Path(self.checkpoint).is_file():
            return None
        return (
            f"weights not found at {self.checkpoint}: put the Medical SAM3 checkpoint there "
            "(see bundle/docs/README.md) or start with --conf checkpoint <file>"
        )


def names(value: str) -> list[str]:
    """A comma-separated option as a list of names."""
    return [part.strip() for part in value.split(",") if part.strip()]
