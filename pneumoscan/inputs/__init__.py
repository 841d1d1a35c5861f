"""Stages 1 and 2 of `pneumoscan run`: find the input files and read their pixels and metadata."""


def is_dicomweb_url(source: object) -> bool:
    """Whether a run's source is a DICOMweb server (inputs.dicomweb) rather than a folder."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))
