"""The app's options (``monailabel start_server --conf key value``), parsed once into typed values.

Two kinds of option:

* the app's own (:class:`AppSettings` fields): which bundle to serve, which labels to offer, the encoding cache,
  the uncertainty scoring and where fine-tuning runs go;
* everything else overrides an id of the bundle's ``configs/inference.json`` (``model_size``, ``ckpt_path``,
  ``batch_size``, ...), typed like the value it replaces; the trainer passes the same overrides to ``train.json``.
  ``--conf configs demo.json`` first applies other configs of the bundle over ``inference.json``, as
  ``monai.bundle run --config_file "['configs/inference.json','configs/demo.json']"`` does; single ``--conf`` ids
  still win.
  ``checkpoint``, ``tracker_checkpoint``, ``device`` and ``vocabulary`` are accepted as the earlier names of
  ``ckpt_path``, ``tracker_ckpt_path``, ``device_name`` and ``vocabulary_file``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scripts.prompts import parse_flag

from .bundle_path import BUNDLE_ROOT
from .security import check_options

ALIASES = {
    "checkpoint": "ckpt_path",
    "tracker_checkpoint": "tracker_ckpt_path",
    "device": "device_name",
    "vocabulary": "vocabulary_file",
}
# inference.json ids that describe one command-line run, not the served model: a request sets them.
PER_RUN_IDS = {"imports", "bundle_root", "image", "datalist", "prompts", "points", "point_labels", "boxes", "device"}
PER_RUN_IDS |= {"output_dir", "output_ext", "initialize", "run", "network", "network_def", "predictor", "inferer"}
PER_RUN_IDS |= {"vocabulary"}
_CONFIG_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.json")
MINIMUM = {
    "cache_mb": 0,
    "dicomweb_cache_seconds": 0,
    "dicomweb_timeout": 0.1,
    "max_prompts": 1,
    "max_points": 1,
    "max_voxels": 1,
    "max_upload_mb": 1,
}


@dataclass(frozen=True)
class AppSettings:
    """The app's own options, plus ``overrides`` of the bundle's inference config; unknown keys are refused."""

    bundle: str = str(BUNDLE_ROOT)  # the bundle folder to serve (e.g. a fine-tuned copy)
    configs: str = ""  # comma-separated files of <bundle>/configs applied over inference.json (e.g. demo.json)
    labels: str = ""  # comma-separated names the tasks offer; empty = the whole vocabulary
    scoring_labels: str = ""  # comma-separated names the uncertainty scoring uses; empty = scoring off
    cache_mb: int = 4096  # image encodings kept for repeated clicks (least recently used first out)
    max_prompts: int = 64  # text prompts (labels + free text) one request may ask for
    max_points: int = 256  # clicks one request may carry
    max_voxels: int = 1024**3  # voxels an image may claim (from its header, before decompressing)
    max_upload_mb: int = 4096  # bytes of one request body (an uploaded image, label or session archive)
    model_dir: str = ""  # fine-tuning runs and published weights; empty = <app>/model, as MONAI Label apps do
    keep_runs: int = 5  # fine-tuning run folders kept under <model_dir>/train (the newest); 0 = keep all
    auth_users: str = ""  # users file (python -m monailabel_app.users); empty = no log-in (docs/security.md)
    auth_secret_file: str = ""  # token signing key, created once; empty = <auth_users>.secret
    auth_token_minutes: int = 480  # how long a log-in token stays valid
    cors_origins: str = ""  # comma-separated web origins allowed to call the API; empty = same origin only
    dicomweb_modalities: str = ""  # comma-separated modalities listed from a PACS; empty = every image series
    dicomweb_cache_seconds: int = 30  # how long the PACS series list is reused before asking again
    dicomweb_user: str = ""  # PACS user for --studies http(s)://...; empty = no credentials (or MONAI Label's env)
    dicomweb_password_file: str = ""  # a file holding that user's password (kept off the command line)
    dicomweb_timeout: float = 60.0  # seconds the PACS may take to answer one HTTP request before it is a 502
    overrides: dict[str, Any] = field(default_factory=dict)  # inference.json id -> value

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppSettings:
        own = {f.name: f for f in fields(cls) if f.name != "overrides"}
        values: dict[str, Any] = {}
        for key in own:
            if key in conf:
                values[key] = _typed(key, conf[key], own[key].default)
        bundle = Path(values.get("bundle", cls.bundle))
        serving = serving_defaults(bundle)
        overrides, unknown = config_overrides(bundle, names(values.get("configs", "")), serving), []
        for key, raw in conf.items():
            if key in own:
                continue
            name = ALIASES.get(key, key)
            if name not in serving:
                unknown.append(key)
                continue
            overrides[name] = _typed(key, raw, serving[name])
        if unknown:
            raise ValueError(
                f"Unknown --conf options {sorted(unknown)}; the app takes {sorted(own)} and the ids of "
                f"{bundle / 'configs' / 'inference.json'}: {sorted(serving)}"
            )
        settings = cls(**values, overrides=overrides)
        for name, lowest in MINIMUM.items():
            if getattr(settings, name) < lowest:
                raise ValueError(f"--conf {name} must be >= {lowest}, got {getattr(settings, name)}")
        if settings.keep_runs < 0:
            raise ValueError(f"--conf keep_runs must be >= 0, got {settings.keep_runs}")
        check_options(settings)
        return settings

    @property
    def bundle_overrides(self) -> dict[str, Any]:
        """The overrides every bundle config the app runs gets: the bundle folder, then the ``--conf`` ids."""
        return {"bundle_root": str(Path(self.bundle).resolve()), **self.overrides}


def serving_defaults(bundle: str | Path) -> dict[str, Any]:
    """The ids of ``<bundle>/configs/inference.json`` a site may set, with their default values."""
    path = Path(bundle) / "configs" / "inference.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--conf bundle {bundle}: cannot read {path} ({error})") from error
    return {k: v for k, v in config.items() if k not in PER_RUN_IDS and not isinstance(v, (dict, list))}


def config_overrides(bundle: str | Path, files: list[str], serving: dict[str, Any]) -> dict[str, Any]:
    """The ids that ``files`` (names in ``<bundle>/configs``, in order) set over inference.json; each must be one a
    site may set (``serving``)."""
    overrides: dict[str, Any] = {}
    for name in files:
        if not _CONFIG_NAME.fullmatch(name):
            raise ValueError(f"--conf configs takes file names in the bundle's configs folder, got {name!r:.80}")
        path = Path(bundle) / "configs" / name
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--conf configs {name}: cannot read {path} ({error})") from error
        if not isinstance(config, dict):
            raise ValueError(f"--conf configs {name}: {path} is not a JSON object")
        unknown = sorted(key for key in config if key not in serving)
        if unknown:
            raise ValueError(f"--conf configs {name}: {unknown} are not inference.json ids the app may set")
        overrides.update(config)
    return overrides


def _typed(key: str, raw: str, default: Any) -> Any:
    """``raw`` as the type of ``default``; where the default is a config expression (``"$..."``), a JSON number,
    boolean or null is taken as such and anything else as a string."""
    if isinstance(default, str) and default.startswith("$"):
        try:
            value = json.loads(raw)
        except ValueError:
            return str(raw)
        return value if value is None or isinstance(value, (bool, int, float)) else str(raw)
    kind = type(default)
    try:
        if kind is bool:
            return parse_flag(raw, f"--conf {key}")
        if kind in (int, float):
            value = kind(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("not finite")
            return value
    except ValueError as error:
        raise ValueError(f"--conf {key} expects a {kind.__name__}, got {raw!r}") from error
    return str(raw)


def names(value: str) -> list[str]:
    """A comma-separated option as a list of names."""
    return [part.strip() for part in value.split(",") if part.strip()]
