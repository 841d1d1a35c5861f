"""Where the report templates are."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path


def templates() -> Traversable:
    """The report templates of the code that is running: inside the package when it was
    installed from a wheel (pyproject.toml maps `templates/` to `pneumoscan/templates`),
    else the `templates/` folder of the source checkout it runs from (an editable install,
    or `python -m pytest` in a clone whose installed copy is another one)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "templates", package.parent / "templates"):
        if (folder / "report.html.j2").is_file():
            return folder
    return files("pneumoscan.templates")  # e.g. imported from a zip
