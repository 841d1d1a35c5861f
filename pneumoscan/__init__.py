"""pneumoscan: chest X-ray pneumonia classification with class activation maps."""

__version__ = "0.1.0"
