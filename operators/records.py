"""Typed records and units that every room may import. A leaf: it imports nothing of ours.

Time on the wire is integer epoch milliseconds (UTC); these are its units.
"""
from __future__ import annotations

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
MINUTES_PER_YEAR = 365 * 24 * 60  # annualising per-minute statistics (crypto trades every minute of the year)
