"""Helpers for the tests that compare singular/eigen vectors, which are defined up to sign."""
import torch


def column_signs(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-column ±1 that best aligns the columns of ``got`` with those of ``ref``."""
    s = torch.sign((got * ref).sum(0))
    assert torch.all(s != 0), "a column is orthogonal to its reference"
    return s


def assert_columns_match(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-9):
    """Columns of ``got`` equal those of ``ref`` up to one sign per column."""
    torch.testing.assert_close(got * column_signs(got, ref), ref, rtol=rtol, atol=atol)
