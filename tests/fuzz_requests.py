"""Generated malformed requests over every endpoint the app serves (the suite's fuzz test and ``bench/bench_fuzz.py``).

Each request is built from a seeded generator: a valid request of one endpoint with one or two of its fields
replaced by a hostile value (wrong JSON types, deep nesting, non-finite numbers, traversal paths, garbage files,
unknown names). None of them may be answered 5xx, and the server must keep serving.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODELS = ("medsam3_auto", "medsam3_clicks", "medsam3_vista3d")
HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    -1,
    0,
    1e308,
    "Infinity",
    "NaN",
    "inf",
    "",
    "x" * 5000,
    [],
    {},
    [[]],
    [[1e30, 0, 0]],
    [[-5, -5, -5]],
    [["a", "b", "c"]],
    [1, 2],
    {"a": [1, {"b": None}]},
    "../../etc/passwd",
    "/etc/passwd",
    "\x00",
    "[[1, 2",
    "😀",
)
HOSTILE_IDS = ("../../x", "/etc/passwd", "..", ".", "", "a/b", "no_such_image", "x" * 300, "%2e%2e", "\x00")
INFER_FIELDS = ("label", "labels", "label_prompt", "foreground", "background", "points", "point_labels", "roi")
INFER_FIELDS += ("text", "result_extension", "result_dtype", "result_compress", "save_label", "label_tag", "image")


@dataclass
class FuzzRequest:
    """One request: ``requests.request(method, url + path, **kwargs)``."""

    method: str
    path: str
    kind: str  # what was broken, for the histogram
    kwargs: dict[str, Any] = field(default_factory=dict)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def nifti_bytes(shape: tuple[int, ...], claim: tuple[int, ...] | None = None) -> bytes:
    """A gzipped NIfTI of zeros; ``claim`` makes its header lie about the grid (a tiny file claiming a huge one)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), np.eye(4))
    raw = bytearray(image.to_bytes())
    if claim is not None:
        dims = np.zeros(8, dtype="<i2")
        dims[0] = len(claim)
        dims[1 : 1 + len(claim)] = claim
        raw[40:56] = dims.tobytes()  # the header's dim field
    return gzip.compress(bytes(raw))


def fuzz_requests(images: list[str], count: int, seed: int = 0) -> Iterator[FuzzRequest]:
    """``count`` hostile requests against a server whose datastore holds ``images``."""
    rng = random.Random(seed)
    makers = (_infer, _infer_params_shape, _activelearning, _datastore, _upload, _session, _names)
    for _ in range(count):
        yield rng.choice(makers)(rng, images)


def _infer(rng: random.Random, images: list[str]) -> FuzzRequest:
    params = {"foreground": [[5, 5, 5]], "label": "liver"}
    for name in rng.sample(INFER_FIELDS, rng.randint(1, 2)):
        params[name] = rng.choice(HOSTILE_VALUES)
    model = rng.choice(MODELS)
    return FuzzRequest("POST", f"/infer/{model}?image={rng.choice(images)}", "infer field", {"data": _form(params)})


def _form(params: dict[str, Any]) -> dict[str, str]:
    return {"params": json.dumps(params)}


def _infer_params_shape(rng: random.Random, images: list[str]) -> FuzzRequest:
    params = rng.choice(("123", "[1,2]", "null", "true", '"s"', "{", deep(1000), deep(50), "{}" * 3, "", "1e999"))
    return FuzzRequest(
        "POST", f"/infer/{rng.choice(MODELS)}?image={rng.choice(images)}", "params", {"data": {"params": params}}
    )


def _activelearning(rng: random.Random, images: list[str]) -> FuzzRequest:
    strategy = rng.choice(("random", "first", "nope", "../x", "uncertainty"))
    body = rng.choice(('{"client_id": "a"}', "[]", "123", deep(1000), "{", "null"))
    headers = {"Content-Type": "application/json"}
    return FuzzRequest("POST", f"/activelearning/{strategy}", "strategy", {"data": body, "headers": headers})


def _datastore(rng: random.Random, images: list[str]) -> FuzzRequest:
    image = rng.choice((*images, *HOSTILE_IDS))
    choice = rng.randrange(5)
    if choice == 0:
        return FuzzRequest("GET", "/datastore/image", "datastore id", {"params": {"image": image}})
    if choice == 1:
        return FuzzRequest(
            "GET", "/datastore/label", "datastore id", {"params": {"label": image, "tag": rng.choice(HOSTILE_IDS)}}
        )
    if choice == 2:
        info = rng.choice(("123", "[1]", deep(1000), "{", '{"a": 1}'))
        return FuzzRequest(
            "PUT", "/datastore/imageinfo", "datastore info", {"params": {"image": image}, "data": {"info": info}}
        )
    if choice == 3:
        return FuzzRequest(
            "DELETE", "/datastore/label", "datastore delete", {"params": {"id": image, "tag": rng.choice(HOSTILE_IDS)}}
        )
    return FuzzRequest("DELETE", "/datastore/", "datastore delete", {"params": {"id": rng.choice(HOSTILE_IDS)}})


def _upload(rng: random.Random, images: list[str]) -> FuzzRequest:
    content = rng.choice(
        (
            os.urandom(rng.randint(0, 2000)),
            b"\x1f\x8b" + os.urandom(300),
            nifti_bytes((4, 4, 4))[:-20],  # truncated
            nifti_bytes((2, 2, 2), claim=(30000, 30000, 30000)),
            nifti_bytes((2, 2, 2), claim=(0, 5, 5)),
            b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n",
        )
    )
    name = rng.choice(("x.nii.gz", "x.nrrd", "x.nhdr", "x.png", "x.exe", "../../x.nii.gz", ""))
    files = {"file": (name, io.BytesIO(content))}
    where = rng.randrange(3)
    if where == 0:
        return FuzzRequest("POST", f"/infer/{rng.choice(MODELS)}", "upload", {"files": files, "data": {"params": "{}"}})
    if where == 1:
        image = rng.choice((*images, *HOSTILE_IDS))
        tag = rng.choice(("final", *HOSTILE_IDS))
        return FuzzRequest(
            "PUT",
            "/datastore/label",
            "label upload",
            {"params": {"image": image, "tag": tag}, "files": {"label": (name, io.BytesIO(content))}},
        )
    return FuzzRequest(
        "PUT", "/datastore/image", "image upload", {"params": {"image": rng.choice(HOSTILE_IDS)}, "files": files}
    )


def _session(rng: random.Random, images: list[str]) -> FuzzRequest:
    content = rng.choice((os.urandom(500), b"", gzip.compress(os.urandom(100))))
    return FuzzRequest(
        "PUT",
        "/session/",
        "session",
        {
            "params": {"uncompress": rng.choice(("true", "false"))},
            "files": {"files": ("s.tar.gz", io.BytesIO(content))},
        },
    )


def _names(rng: random.Random, images: list[str]) -> FuzzRequest:
    name = rng.choice(("nope", "..", "%00", "x" * 300, "medsam3_autoX"))
    method, path = rng.choice(
        (("POST", f"/infer/{name}?image={images[0]}"), ("POST", f"/scoring/{name}"), ("GET", f"/train/{name}"))
    )
    return FuzzRequest(method, path, "unknown name", {"data": {"params": "{}"}})
