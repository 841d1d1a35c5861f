"""Stages 1 and 2 of `pneumoscan run`: find the input files and read their pixels and metadata."""


def is_dicomweb_url(source: object) -> bool:
    """Whether a run's source is a DICOMweb server (inputs.dicomweb) rather than a folder."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


# The largest DICOMweb instance retrieved, once decompressed (`run --max-instance-size`): a
# chest radiograph is 5 to 60 MB (3000 x 3000 pixels of 16 bits is 18 MB uncompressed);
# 256 MiB leaves room for unusual ones and still refuses what no chest radiograph is.
MAX_INSTANCE_BYTES = 256 * 2**20
