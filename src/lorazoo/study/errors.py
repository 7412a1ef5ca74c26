"""Errors of the study runner and its store."""
from ..errors import LorazooError


class StudyError(LorazooError):
    """A study cannot be run or read: bad file, locked study, missing backend."""


class GridError(StudyError):
    """A study's grid is invalid (unknown variant or task, bad number); raised before any trial runs."""
