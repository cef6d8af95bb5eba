"""Shipped YAML configs (package data)."""
