"""landmark-retrieval: instance-level image retrieval, from images to ranked results."""

__version__ = "0.1.0"
