"""A second module, so the static resolver has a re-export to follow."""


def reexported_builder(width: int, depth: int = 2):
    return {"width": width, "depth": depth}
