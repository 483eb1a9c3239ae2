"""Medical SAM3 MONAI Label app: tasks and services over the bundle's library, imported as ``scripts``."""

from .bundle_path import ensure_bundle_on_path

ensure_bundle_on_path()
