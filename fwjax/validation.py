"""Argument checks shared by every fwjax layer (imports nothing but the standard library)."""

from __future__ import annotations


def check_positive_ints(*, allow_none: bool = False, **values) -> None:
    """Raises unless every value is a positive ``int`` (``bool`` is not one), or None when
    ``allow_none``.

    Example: ``check_positive_ints(chunk_size=chunk_size, allow_none=True)``.

    Raises:
      ValueError: naming the first offending value, e.g. ``"chunk_size=0 must be a positive
        int or None"``.
    """
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            suffix = " or None" if allow_none else ""
            raise ValueError(f"{name}={value!r} must be a positive int{suffix}")
