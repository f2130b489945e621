"""Argument checks shared by every fwjax layer (imports nothing but the standard library)."""

from __future__ import annotations


def check_ints(*, minimum: int, allow_none: bool = False, **values) -> None:
    """Raises unless every value is an ``int`` (``bool`` is not one) ``>= minimum``, or None
    when ``allow_none``.

    Example: ``check_ints(minimum=0, seed=seed)``.

    Raises:
      ValueError: naming the first offending value: ``"seed=-1 must be a non-negative int"``
        (minimum 0), ``"... must be a positive int"`` (minimum 1), ``"... must be an int >= 2"``
        (otherwise), with ``" or None"`` when ``allow_none``.
    """
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum)
            suffix = " or None" if allow_none else ""
            raise ValueError(f"{name}={value!r} must be {kind or f'an int >= {minimum}'}{suffix}")


def check_positive_ints(*, allow_none: bool = False, **values) -> None:
    """Raises unless every value is a positive ``int`` (``bool`` is not one), or None when
    ``allow_none`` (:func:`check_ints` with ``minimum=1``).

    Example: ``check_positive_ints(chunk_size=chunk_size, allow_none=True)``.

    Raises:
      ValueError: naming the first offending value, e.g. ``"chunk_size=0 must be a positive
        int or None"``.
    """
    check_ints(minimum=1, allow_none=allow_none, **values)
