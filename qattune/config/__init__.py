"""Configs: load YAML, apply overrides, validate, and build `_component_` objects.

Generic: this package knows no model, recipe or quantizer, and imports nothing heavy.
"""

from qattune.config.instantiate import instantiate, partial
from qattune.config.loader import load_config
from qattune.config.schema import Component, RecipeConfig, Unsupported
from qattune.config.validate import Problem, validate_config
from qattune.config.recipe_main import recipe_main

__all__ = [
    "Component", "Problem", "RecipeConfig", "Unsupported", "instantiate", "load_config", "partial", "recipe_main",
    "validate_config",
]
