"""Shipped recipes: one script per recipe, runnable in-process or through torchrun."""
