"""servematrix/versions.py: the one release order and the one reading of a waiver's `until:`,
bounded so that text another tool wrote cannot reach int() unbounded."""

import datetime

import pytest

from servematrix.versions import MAX_CHARS, VersionError, parse_until, version_key


def test_a_release_name_and_its_bare_version_order_alike():
    assert version_key("cpu-0.32.0") == version_key("0.32.0") == (0, 32, 0)
    assert sorted(["cpu-0.9.0", "cpu-0.32.0", "cpu-0.18.1"], key=version_key) == ["cpu-0.9.0", "cpu-0.18.1",
                                                                                   "cpu-0.32.0"]


@pytest.mark.parametrize("text, needle", [
    ("1" * 5000, "5000 characters"), ("cpu-0." + "9" * 20, "20-digit number"), ("x" * (MAX_CHARS + 1), "characters"),
])
def test_an_absurd_version_is_a_version_error_not_an_int_overflow(text, needle):
    with pytest.raises(VersionError, match=needle):
        version_key(text)


def test_until_is_a_date_or_a_release_and_nothing_else():
    assert parse_until("2027-01-31") == datetime.date(2027, 1, 31)
    assert parse_until("cpu-0.33.0") == ("cpu", (0, 33, 0))
    for bad in ("garbage", "cpu-0.x", "2027-02-30", "cpu-0.1234567890.0", "cpu-0." + "9" * 5000, "CPU-0.1.0"):
        with pytest.raises(VersionError):
            parse_until(bad)
    assert issubclass(VersionError, ValueError)  # pydantic validators turn it into a located field error
