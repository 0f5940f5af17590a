"""Packages: everything under src/, and the Hydra configs of the top-level conf/ as `lmdistill.conf`
(inside the wheel; a source checkout or an editable install reads conf/ directly, see
`lmdistill.resources.CONF_DIR`). All other metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["lmdistill.conf", *(f"lmdistill.conf.{p}" for p in find_namespace_packages("conf"))]

setup(
    packages=[*find_packages("src"), *CONF],
    package_dir={"": "src", "lmdistill.conf": "conf"},
    package_data={package: ["*.yaml"] for package in CONF},
)
