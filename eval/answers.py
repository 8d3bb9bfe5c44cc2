"""Answer parsing for free generation: the numbers and times a model writes, read back as values.

Needle tasks score a generated answer by the value it states, not its wording: "4821", "The number is 4,821." and
"4821." all answer 4821; "1:12:34", "4354.5 seconds", "72 s", "at 1h 2m", "1 minute 5 seconds" are times in
seconds. A string that states no value, or two different values where one is asked, parses to None (wrong), so
hedging ("either 12 or 40") is not rewarded. The table of accepted and rejected strings is tests/test_needle.py.
"""
from __future__ import annotations

import re

_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBER = re.compile(rf"(?<![\w.])-?{_NUM}(?![\w.]*\d)")
_CLOCK = re.compile(r"(?<![\d:.])(\d+):([0-5]\d)(?::([0-5]\d(?:\.\d+)?))?(?![\d:])")
_UNITS = {"h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
          "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
          "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0}
_UNIT_PART = re.compile(rf"({_NUM})\s*(hours|hour|hrs|hr|h|minutes|minute|mins|min|m|seconds|second|secs|sec|s)"
                        r"(?![a-z])", re.IGNORECASE)


def _value(s: str) -> float:
    return float(s.replace(",", ""))


def parse_numbers(text: str) -> list[float]:
    """Every number stated in `text`, in order ("4,821" is one number; digits inside words are ignored)."""
    return [_value(m.group().lstrip("-")) * (-1 if m.group().startswith("-") else 1)
            for m in _NUMBER.finditer(text)]


def parse_number(text: str) -> float | None:
    """The one number `text` states (repeats of it are fine), else None (no number, or two different ones)."""
    values = set(parse_numbers(text))
    return values.pop() if len(values) == 1 else None


def parse_time(text: str) -> float | None:
    """The one time `text` states, in seconds, else None.

    Accepted forms: a clock "H:MM:SS(.s)" or "M:SS"; unit runs "1h 2m 3s", "2 minutes 5 seconds", "72 s",
    "4354.5 seconds"; a bare number (seconds). Two different times, or none, give None.
    """
    times = set()
    rest = text
    for m in _CLOCK.finditer(text):
        a, b, c = m.groups()
        times.add(float(int(a) * 3600 + int(b) * 60 + float(c)) if c is not None else float(int(a) * 60 + int(b)))
    rest = _CLOCK.sub(" ", rest)
    # a run of adjacent unit parts ("1h 2m 3s", "1 minute and 5 seconds") is one time
    parts = list(_UNIT_PART.finditer(rest))
    run, end = None, None
    for m in parts:
        gap = rest[end:m.start()] if end is not None else None
        if run is not None and gap is not None and re.fullmatch(r"[\s,]*(and)?[\s,]*", gap):
            run += _value(m.group(1)) * _UNITS[m.group(2).lower()]
        else:
            if run is not None:
                times.add(run)
            run = _value(m.group(1)) * _UNITS[m.group(2).lower()]
        end = m.end()
    if run is not None:
        times.add(run)
    rest = _UNIT_PART.sub(" ", rest)
    if not times:  # a bare number is seconds; alongside an explicit time it is noise ("frame 3 at 1:05")
        times.update(parse_numbers(rest))
    return times.pop() if len(times) == 1 else None
