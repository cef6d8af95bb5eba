"""Packaging glue that pyproject.toml cannot express: the top-level `recipes/` and `configs/` folders
ship inside the installed package as `qattune.recipes` and `qattune.configs` (each config folder as a
data package). All metadata is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

CONFIG_FOLDERS = sorted(p for p in Path("configs").rglob("*") if p.is_dir() and "__pycache__" not in p.parts)
CONFIG_PACKAGES = ["qattune.configs"] + ["qattune.configs." + ".".join(p.parts[1:]) for p in CONFIG_FOLDERS]

setup(
    packages=find_packages(include=["qattune", "qattune.*"]) + ["qattune.recipes", *CONFIG_PACKAGES],
    package_dir={"qattune.recipes": "recipes", "qattune.configs": "configs"},
    package_data={name: ["*.yaml"] for name in CONFIG_PACKAGES},
)
