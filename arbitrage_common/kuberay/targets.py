"""Which configs have manifests under k8s/, and writing them without partial results."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..config import AppConfig, load_config
from ..paths import configs_dir, project_home
from ..presets import list_presets, preset_path
from .render import RENDERED_MARK, TARGET_HINT, render_kustomize

CPU_DEMO = "cpu-demo"  # configs/cpu-demo.yaml: the embedded default on a CPU-only cluster


def target_names() -> list[str]:
    """cpu-demo, then every preset."""
    return [CPU_DEMO] + [p.stem for p in list_presets()]


def target_path(name: str, option: str = "--preset") -> Path:
    """The config file of one target; ValueError names an unknown one and lists the known
    (``option``: the command-line argument that named it)."""
    if name == CPU_DEMO:
        return configs_dir() / f"{CPU_DEMO}.yaml"
    try:
        return preset_path(name)
    except ValueError:
        raise ValueError(f"{option}: unknown preset {name!r} (known: {', '.join(target_names())})") from None


def target_config(name: str) -> AppConfig:
    """The AppConfig of one target; ValueError names the unknown one and lists the known, or
    (a preset that exists but does not validate: ``config.ConfigError``) the file and the
    fields at fault, never calling it unknown."""
    return load_config(target_path(name))


def render_targets(configs: dict[str, AppConfig], sources: dict[str, Path] | None = None,
                   user_configs: bool = False) -> dict[str, str]:
    """Every file of every target (relative to k8s/). Raises before anything is written, naming
    the target's config file (``sources``: name -> file; default ``target_path``) first, as
    `arbitrage config check` does: ``<file>: <field>: <message>``. ``user_configs``: the
    configs are a user's --config files, not the project's targets."""
    files: dict[str, str] = {}
    for name, cfg in configs.items():
        try:
            files.update(render_kustomize(cfg, name, target=not user_configs))
        except ValueError as exc:
            source = sources[name] if sources else target_path(name)
            raise ValueError(f"{source}: {exc}") from None
    return files


def default_out() -> Path:
    return project_home() / "k8s"


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    """Write every file atomically (a temp file then a rename each); rendering is already done,
    so a bad config never leaves a partial set behind."""
    written = []
    for rel, text in sorted(files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(path)
    return written


def drift(files: dict[str, str], out: Path) -> list[str]:
    """Rendered files that are missing or differ on disk (relative paths)."""
    return [rel for rel, text in sorted(files.items())
            if not (out / rel).is_file() or (out / rel).read_text() != text]


def _target_dirs(out: Path, names: list[str]) -> list[Path]:
    """The directories rendered for the targets ``names``."""
    return [root for name in names for root in (out / "base" / name, out / "overlays" / name,
                                                 out / "overlays" / f"{name}-ha")]


def _rendered_by_us(path: Path, target_only: bool = False) -> bool:
    """The file starts with the render header (``target_only``: a project target's)."""
    try:
        with path.open() as f:
            first, second = f.readline(), f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith(RENDERED_MARK) and (not target_only or second == TARGET_HINT)


def orphans(out: Path, known: list[str]) -> list[str]:
    """Files a render of the project's targets wrote under base/ and overlays/ (their header says
    so) outside every directory of the targets ``known``: a removed or renamed preset's. Only
    reported, never deleted: a user's --config rendering of an earlier version carried the same
    header."""
    owned = _target_dirs(out, known)
    return sorted(str(p.relative_to(out)) for top in (out / "base", out / "overlays") if top.is_dir()
                  for p in top.rglob("*")
                  if p.is_file() and not any(p.is_relative_to(root) for root in owned) and _rendered_by_us(p, True))


def stale(files: dict[str, str], out: Path, names: list[str]) -> list[str]:
    """Files in the directories of the targets ``names`` that an earlier render wrote (they
    start with ``RENDERED_MARK``) and this one no longer produces, e.g. a ``scheduling.yaml``
    whose options were removed. Nothing else: a file written by hand, or another target's
    (a config of the user's rendered with --config, a GitOps repo's own overlays), stays."""
    found = {str(p.relative_to(out)) for root in _target_dirs(out, names) if root.is_dir()
             for p in root.rglob("*") if p.is_file() and _rendered_by_us(p)}
    return sorted(found - set(files))


def remove_stale(files: dict[str, str], out: Path, names: list[str]) -> list[Path]:
    """Delete ``stale`` files, then the directories they leave empty; the deleted paths."""
    removed = []
    for rel in stale(files, out, names):
        path = out / rel
        path.unlink()
        removed.append(path)
        for parent in path.parents:
            if parent in (out, out / "base", out / "overlays") or any(parent.iterdir()):
                break
            parent.rmdir()
    return removed
