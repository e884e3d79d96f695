"""The one exception type that momentkit raises for bad input."""

from __future__ import annotations


class MomentInputError(ValueError):
    """Raised for input that momentkit cannot take.

    Examples: a negative variance, a covariance that is not square or not symmetric,
    mismatched shapes, NaN, an unsupported layer or network. The message names the
    argument and what was wrong with it. A subclass of ``ValueError`` so callers that
    already catch ``ValueError`` keep working.
    """
