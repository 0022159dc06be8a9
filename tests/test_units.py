"""Units are defined once; every time and size directive relies on these rules."""
import pytest

from mplb.config import parse_size, parse_time
from mplb.config.units import format_time


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("1m", 60.0), ("2h", 7200.0),
    ("1d", 86400.0), ("1h30m", 5400.0), ("1d2h3m4s5ms", 93784.005), ("3600s", 3600.0),
    ("1.5s", 1.5), (" 10s ", 10.0),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "5x", "s", "-1s", "1h1h", "30m1h", "10ms5s", "1 h", "1hh", "h1", "1k", "abc",
])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize("text, size", [
    ("0", 0), ("512", 512), ("8k", 8192), ("8K", 8192), ("1m", 1048576), ("1M", 1048576),
    ("2g", 2 * 1024 ** 3),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1t", "k", "1.5m", "-1", "10kb", "1 m"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("seconds, text", [(60, "1m"), (3600, "1h"), (0.5, "500ms"),
                                           (90, "90s"), (86400, "1d")])
def test_format_time(seconds, text):
    assert format_time(seconds) == text
