"""Where the bundled ``configs/`` and ``models/`` live, whatever the install.

In order: ``$ARBITRAGE_HOME`` (an image or a volume says where), the source checkout that
holds this package (editable installs, tests), then ``<prefix>/share/arbitrage-serve``, where
a non-editable install (``pip install .``, the container image) puts them (pyproject's
data-files). Import-light: no Ray, torch or yaml.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "ARBITRAGE_HOME"
SHARE_SUBDIR = Path("share") / "arbitrage-serve"
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _holds_bundle(root: Path) -> bool:
    return (root / "configs").is_dir() and (root / "models").is_dir()


def project_home() -> Path:
    """The directory holding ``configs/`` and ``models/``. ``$ARBITRAGE_HOME`` wins when set
    (even if wrong: a clear 'no such preset/model' later beats a silent fallback)."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    for root in (_SOURCE_ROOT, Path(sys.prefix) / SHARE_SUBDIR):
        if _holds_bundle(root):
            return root
    return _SOURCE_ROOT  # nothing found: paths below it fail with their own names


def configs_dir() -> Path:
    return project_home() / "configs"


def presets_dir() -> Path:
    return configs_dir() / "presets"


def models_dir() -> Path:
    return project_home() / "models"
