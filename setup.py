"""Packaging glue that pyproject.toml cannot express: the top-level `recipes/` and `configs/` folders
ship inside the installed package as `qattune.recipes` and `qattune.configs` (all metadata is in
pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["qattune", "qattune.*"]) + ["qattune.recipes", "qattune.configs"],
    package_dir={"qattune.recipes": "recipes", "qattune.configs": "configs"},
)
