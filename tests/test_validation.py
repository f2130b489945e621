"""fwjax.validation: the one integer check every layer uses, and its messages."""

import pytest

from fwjax.validation import check_ints, check_positive_ints


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_ints(minimum=0, seed=-1), r"^seed=-1 must be a non-negative int$"),
        (lambda: check_ints(minimum=2, n_keys=1), r"^n_keys=1 must be an int >= 2$"),
        (lambda: check_ints(minimum=0, seed=True), r"^seed=True must be a non-negative int$"),
        (lambda: check_ints(minimum=0, seed=1.0), r"^seed=1\.0 must be a non-negative int$"),
        (lambda: check_positive_ints(a=1, b=0), r"^b=0 must be a positive int$"),
        (lambda: check_positive_ints(a=None), r"^a=None must be a positive int$"),
        (
            lambda: check_positive_ints(chunk_size="8", allow_none=True),
            r"^chunk_size='8' must be a positive int or None$",
        ),
    ],
)
def test_bad_values_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_good_values_pass():
    check_ints(minimum=0, seed=0, other=5)
    check_ints(minimum=2, n_keys=2)
    check_positive_ints(a=1, b=10**9)
    check_positive_ints(chunk_size=None, allow_none=True)
    check_ints(minimum=-3)  # nothing to check
