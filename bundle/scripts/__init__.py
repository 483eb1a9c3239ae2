"""Medical SAM3 bundle library code, imported as ``scripts`` (MONAI puts the bundle root on ``sys.path``)."""

from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
