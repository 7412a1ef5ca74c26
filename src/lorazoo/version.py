__version__ = "0.1.0"
FORMAT = 1  # adapter file format; bump when saved files change meaning
