"""Where cluster profiles live and how a sweep names one.

A profile is a YAML file of resource defaults for one kind of node (partition, gres,
time, ...), kept in `slurm/profiles/<name>.yaml`. A sweep's `resources.profile: h100`
picks `h100.yaml`; the sweep's own resource fields override the profile's, field by
field. This module only finds files; validating their content is `orchestrator.sweep.spec`'s
job (the same `ResourcesSpec` rules apply to both, so a profile cannot hold a value a
sweep could not).
"""

from __future__ import annotations

import os
from pathlib import Path

# Extra directories searched first (os.pathsep-separated), e.g. a site's own profiles.
PROFILES_ENV = "AULLM_PROFILES_DIR"

# The repository checkout this package lives in: profiles ship beside the code.
_REPO_PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"

_SUFFIXES = (".yaml", ".yml")


def profile_dirs(sweep_file: Path | None = None) -> list[Path]:
    """Directories searched for `<name>.yaml`, first match wins.

    Order: $AULLM_PROFILES_DIR, then `slurm/profiles` beside the sweep file's folder
    (a sweep in `<repo>/sweeps/` finds `<repo>/slurm/profiles`), then the profiles
    shipped with this package.
    """
    dirs: list[Path] = []
    for entry in os.environ.get(PROFILES_ENV, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry).expanduser())
    if sweep_file is not None:
        dirs.append(Path(sweep_file).resolve().parent.parent / "slurm" / "profiles")
    dirs.append(_REPO_PROFILES)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def is_profile_path(name: str) -> bool:
    """A profile written as a file path (`../site/a100.yaml`) rather than a name."""
    return "/" in name or os.sep in name or name.endswith(_SUFFIXES)


def find_profile(name: str, sweep_file: Path | None = None) -> Path | None:
    """The file a profile name (or path, relative to the sweep file) refers to, or None."""
    if is_profile_path(name):
        path = Path(name).expanduser()
        if not path.is_absolute() and sweep_file is not None:
            path = Path(sweep_file).resolve().parent / path
        return path if path.is_file() else None
    for directory in profile_dirs(sweep_file):
        for suffix in _SUFFIXES:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def available_profiles(sweep_file: Path | None = None) -> list[str]:
    """Names of every profile found on the search path (for error messages)."""
    names: set[str] = set()
    for directory in profile_dirs(sweep_file):
        if directory.is_dir():
            for path in directory.iterdir():
                if path.suffix in _SUFFIXES and path.is_file():
                    names.add(path.stem)
    return sorted(names)


def gres_gpu_count(gres: str | None) -> int | None:
    """GPUs a Slurm gres string asks for (gpu, gpu:4, gpu:h100, gpu:h100:4: a trailing
    number is the count, otherwise one; entries of other kinds are ignored), or None when
    it names no GPU. Light on purpose: `status` uses it without loading the sweep schema."""
    total = None
    for entry in (gres or "").split(","):
        parts = entry.strip().split(":")
        if parts[0] != "gpu":
            continue
        total = (total or 0) + (int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1)
    return total
