"""Where the report templates are: `pneumoscan/templates`, a link to the top-level `templates/`
folder in a source checkout and the folder itself in an installed wheel."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def templates() -> Traversable:
    return files("pneumoscan").joinpath("templates")
