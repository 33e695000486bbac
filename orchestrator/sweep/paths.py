"""How a sweep file's strings become values: `${VAR}` / `${VAR:-default}` expansion, and paths
anchored at the sweep file's folder. One place for the rule, used by the spec (with pydantic)
and by `status`'s quick path, which reads the YAML alone and must agree with the spec exactly.
Imports neither pydantic nor yaml.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnsetVariable(LookupError):
    """`${VAR}` without a default names a variable the environment does not set."""

    def __init__(self, var: str) -> None:
        super().__init__(var)
        self.var = var


def env_names(text: str) -> set[str]:
    """The variables `text` refers to (set or not)."""
    return {m.group(1) for m in ENV_REF.finditer(text)}


def expand_env(text: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (the default also replaces an empty VAR);
    raises `UnsetVariable` for an unset VAR without default."""

    def substitute(match: re.Match[str]) -> str:
        var, default = match.group(1), match.group(2)
        value = os.environ.get(var)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise UnsetVariable(var)
            return default
        return value

    return ENV_REF.sub(substitute, text)


def anchored_path(text: str, base_dir: Path | None) -> str:
    """Env-expand, `~`-expand and anchor a relative path at `base_dir` (the sweep file's folder);
    an absolute result is normalised. Raises `UnsetVariable` as `expand_env` does."""
    path = Path(expand_env(text)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return os.path.normpath(path) if path.is_absolute() else str(path)
