"""Put the bundle on ``sys.path`` once, so its library imports as ``scripts`` (as ``monai.bundle run`` does)."""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2] / "bundle"
REPO_ROOT = BUNDLE_ROOT.parent


def ensure_bundle_on_path() -> Path:
    if str(BUNDLE_ROOT) not in sys.path:
        sys.path.insert(0, str(BUNDLE_ROOT))
    return BUNDLE_ROOT
