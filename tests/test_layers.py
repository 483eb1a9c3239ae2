"""The bundle's library is layered: each module imports only modules on lower floors, and files stay small.

The floors are those of ``docs/architecture.md``; a module added to ``bundle/scripts`` must be given one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from scripts.model_builder import build_medsam3

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"
FLOORS = {
    0: {"dicom_series"},  # below image_io, which imports it
    1: {
        "clicks",
        "prompts",
        "image_io",
        "intensity",
        "metrics",
        "adapters",
        "losses",
        "model_sizes",
        "cancellation",
        "phantom_dicom",
        "lr_schedule",
        "presence_pass",
        "click_selection",
        "click_boundaries",
        "low_res_grid",
        "volume_encoding",
    },
    2: {"timing", "cpu_compat", "click_training", "checkpoint", "vocabulary", "orientation", "image_writing"},
    3: {"network", "label_numbering", "slices", "phantom", "dicom_seg"},
    4: {"model_builder", "predictor", "training_data", "phantom_dataset"},
    5: {"encoding_cache"},
    6: {"inference"},
    7: {"runner", "training", "uncertainty"},
    8: {"evaluation", "validation"},
}
FLOOR = {module: floor for floor, modules in FLOORS.items() for module in modules}
MAX_LINES = 400


def _imports(path: Path) -> set[str]:
    """Modules of ``scripts`` that ``path`` imports, at any depth of the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("scripts."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("scripts."))
    return found


MODULES = sorted(p.stem for p in SCRIPTS.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_floor() -> None:
    assert set(MODULES) == set(FLOOR), "give new modules a floor in FLOORS and docs/architecture.md"


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_go_down(module: str) -> None:
    upward = {name: FLOOR[name] for name in _imports(SCRIPTS / f"{module}.py") if FLOOR[name] >= FLOOR[module]}
    assert not upward, f"{module} (floor {FLOOR[module]}) imports modules at its floor or above: {upward}"


@pytest.mark.parametrize("module", MODULES)
def test_files_stay_small(module: str) -> None:
    lines = len((SCRIPTS / f"{module}.py").read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}.py has {lines} lines: split it by concern"


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    """Training seeds the RNG once (``set_determinism``); building the network must not reseed it."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_medsam3("tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    second = build_medsam3("tiny", device="cpu")
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
