__version__ = "0.1.0"
FORMAT = 2  # adapter file format; bump when saved files change meaning (2: config in the header, checksum)
