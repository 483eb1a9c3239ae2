"""A training set of varied phantoms, written as real files with a MONAI datalist: what the demo model learns from.

Each case draws its own modality (CT or MR), noise, MR bias field, grid size, voxel spacing (anisotropic),
storage orientation and in-plane tilt, on top of the anatomy the phantom's seed varies (organ positions, sizes,
rotations, lobulation and intensities). Case ``i`` uses phantom seed ``first_seed + i``; the demo model trains on
seeds from :data:`DEMO_FIRST_SEED` up, so the tests' phantoms (seeds below it) are held out.

``python -m scripts.phantom_dataset --output_dir phantoms --cases 40``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .phantom import PHANTOM_LABELS, write_phantom

__all__ = ["DEMO_FIRST_SEED", "HELD_OUT_CASES", "absent_labels", "write_held_out_dataset", "write_phantom_dataset"]

DEMO_FIRST_SEED = 1000
ORIENTATIONS = ("RAS", "LPS", "LAS", "PSR", "ILA", "RPI")
# The demo model's golden held-out cases: (name, kind, orientation, seed), seeds it never trained on.
HELD_OUT_CASES = (("ct_lps", "ct", "LPS", 11), ("ct_psr", "ct", "PSR", 12), ("mr_ila", "mr", "ILA", 13))
HELD_OUT_LABELS = {"1": "liver", "2": "spleen", "3": "right kidney", "4": "left kidney"}
# Vocabulary labels a phantom shows without labelling them as such: never trained as "not here".
PHANTOM_OVERLAPS = ("kidneys", "spinal cord")


def absent_labels(names: Iterable[str]) -> list[str]:
    """The vocabulary labels (``names``) no phantom shows, for ``train.json --absent_labels``: a model trained on
    phantoms with them learns to answer them "not here" instead of guessing (docs/benchmarks.md, the demo model)."""
    shown = set(PHANTOM_LABELS.values()) | set(PHANTOM_OVERLAPS)
    return [name for name in names if name not in shown]


def write_phantom_dataset(
    output_dir: str | Path,
    cases: int = 40,
    validation: int = 4,
    first_seed: int = DEMO_FIRST_SEED,
    mr_fraction: float = 0.3,
) -> str:
    """Write ``cases`` training and ``validation`` validation phantoms; return the datalist's path.

    The datalist has ``training`` and ``validation`` items (``image``, ``label`` relative to it) and ``labels``
    (:data:`scripts.phantom.PHANTOM_LABELS`, whose values are the vocabulary's indices). Existing files are reused.
    """
    if cases < 1 or validation < 0:
        raise ValueError(f"cases must be >= 1 and validation >= 0, got {cases} and {validation}")
    root = Path(output_dir)
    datalist = root / "datalist.json"
    items = [_case(root, first_seed + i, mr_fraction) for i in range(cases + validation)]
    content = {"training": items[:cases], "validation": items[cases:], "labels": PHANTOM_LABELS}
    if not datalist.is_file() or json.loads(datalist.read_text()) != json.loads(json.dumps(content)):
        datalist.write_text(json.dumps(content, indent=2))
    return str(datalist)


def write_held_out_dataset(output_dir: str | Path) -> Path:
    """The held-out cases (80 x 72 x 28 at 1.6 x 1.6 x 3.5 mm) and a datalist of them as ``testing``, labelled with
    the four organs the golden tests score; returns the datalist's path."""
    root = Path(output_dir)
    items = []
    for name, kind, code, seed in HELD_OUT_CASES:
        image, label = write_phantom(
            root, name, kind=kind, orientation=code, shape=(80, 72, 28), spacing=(1.6, 1.6, 3.5), seed=seed
        )
        items.append({"image": str(image), "label": str(label)})
    path = root / "datalist.json"
    path.write_text(json.dumps({"testing": items, "labels": HELD_OUT_LABELS}))
    return path


def _case(root: Path, seed: int, mr_fraction: float) -> dict[str, str]:
    """One varied phantom (drawn from its seed alone, so a case is the same whoever writes it)."""
    rng = np.random.default_rng([seed, 7])
    name = f"case_{seed}"
    if not (root / f"{name}.nii.gz").is_file():
        in_plane = int(rng.integers(56, 97))
        kind = "mr" if rng.random() < mr_fraction else "ct"
        write_phantom(
            root,
            name,
            kind=kind,
            orientation=str(rng.choice(ORIENTATIONS)),
            shape=(in_plane, in_plane, int(rng.integers(20, 41))),
            spacing=(*(float(rng.uniform(1.2, 2.2)),) * 2, float(rng.uniform(2.0, 4.0))),
            seed=seed,
            tilt_deg=float(rng.uniform(-10.0, 10.0)),
            noise=float(rng.uniform(8.0, 35.0) if kind == "ct" else rng.uniform(5.0, 25.0)),
        )
    return {"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a varied phantom training set with a MONAI datalist")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--validation", type=int, default=4)
    parser.add_argument("--first_seed", type=int, default=DEMO_FIRST_SEED)
    args = parser.parse_args(argv)
    try:
        print(write_phantom_dataset(args.output_dir, args.cases, args.validation, args.first_seed))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
