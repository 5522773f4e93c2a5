"""Parse and format link rates ("100mbit"), delays ("5ms") and sizes ("4G").

Rates follow ``tc``: ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per
second, and -- as in tc, which trips many people -- ``bps``, ``kbps``,
``mbps``, ``gbps`` are *bytes* per second (``10mbps`` = 80 Mbit/s). A plain
number is bits per second. Multipliers are decimal for rates (1mbit = 10**6
bit/s) and binary for sizes (1G = 2**30 bytes). A bare delay number is in ms.
"""

from __future__ import annotations

import re

_RATE_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    # tc: "bps" means bytes per second
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
}
_DELAY_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    m = _NUMBER.match(text)
    if not m:
        raise ValueError(f"cannot read {what} {text!r}; write it like {example!r}")
    return float(m.group(1)), m.group(2).lower()


def parse_rate(value: str | float) -> int:
    """Bits per second from ``"100mbit"``, ``"1gbit"``, ``"10mbps"`` (bytes/s, as in tc) or a number."""
    if type(value) in (int, float):
        number, unit = float(value), "bit"
    else:
        number, unit = _split(str(value), "rate", "100mbit")
        unit = unit or "bit"
    if unit not in _RATE_UNITS:
        raise ValueError(f"unknown rate unit {unit!r} in {value!r}; use one of {', '.join(_RATE_UNITS)}")
    bits = round(number * _RATE_UNITS[unit])
    if bits <= 0:
        raise ValueError(f"rate {value!r} must be positive")
    return bits


def parse_delay(value: str | float) -> float:
    """Seconds from ``"5ms"``, ``"500us"``, ``"0.1s"``; a bare number is milliseconds."""
    if type(value) in (int, float):
        seconds = float(value) * 1e-3
    else:
        number, unit = _split(str(value), "delay", "5ms")
        unit = unit or "ms"
        if unit not in _DELAY_UNITS:
            raise ValueError(f"unknown delay unit {unit!r} in {value!r}; use s, ms or us")
        seconds = number * _DELAY_UNITS[unit]
    if seconds < 0 or seconds > 10:
        raise ValueError(f"delay {value!r} must be between 0 and 10 s")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from ``"4G"``, ``"512M"``, ``"4GiB"`` (binary multipliers) or an integer."""
    if type(value) is int:
        size = value
    else:
        number, unit = _split(str(value), "size", "4G")
        if unit not in _SIZE_UNITS:
            raise ValueError(f"unknown size unit {unit!r} in {value!r}; use K, M, G or T")
        size = round(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {value!r} must be positive")
    return size


def format_rate(bits_per_s: int) -> str:
    """The shortest exact tc-style text for a rate: 100000000 -> ``"100mbit"``."""
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits_per_s % mult == 0:
            return f"{bits_per_s // mult}{unit}"
    return f"{bits_per_s}bit"


def format_delay(seconds: float) -> str:
    """``0.005`` -> ``"5ms"``, ``0.0005`` -> ``"500us"``."""
    us = round(seconds * 1e6)
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def format_size(size: int) -> str:
    """``4294967296`` -> ``"4G"``; falls back to bytes."""
    for unit, mult in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return str(size)
