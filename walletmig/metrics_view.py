"""What the live views (`walletmig migration watch`, `walletmig terminal watch`) read and draw:
one scrape of every endpoint in WALLETMIG_METRICS_URLS merged into samples, rates between two
scrapes, and short trend lines (sparklines) of the last samples.

The same metrics Prometheus scrapes (observability.metrics), read straight from the processes:
an engineer on the embedded stack needs no Prometheus to watch a migration.
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Scrape",
    "Trend",
    "metrics_urls",
    "scrape",
    "sparkline",
]

SCRAPE_TIMEOUT_S = 2.0
SCRAPE_BODY_MAX_BYTES = 8 * 1024 * 1024  # a worker's page is tens of KiB
URLS_MAX = 32
TREND_SAMPLES_DEFAULT = 30
SPARK = "▁▂▃▄▅▆▇█"

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """Every sample of one round of scrapes, summed over the endpoints (a counter of two
    workers is the fleet's). `errors`: url -> why it could not be read."""

    at_s: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        key = tuple(sorted(labels.items()))
        series = self.samples.setdefault(name, {})
        series[key] = series.get(key, 0.0) + value

    def series(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of `name` whose labels include `match`, NaN values left out."""
        out: list[tuple[dict[str, str], float]] = []
        for key, value in self.samples.get(name, {}).items():
            labels = dict(key)
            if all(labels.get(k) == v for k, v in match.items()) and not math.isnan(value):
                out.append((labels, value))
        return out

    def total(self, name: str, **match: str) -> float | None:
        """The sum of the matching series; None when none is exported."""
        found = self.series(name, **match)
        return sum(value for _, value in found) if found else None

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """The matching series summed per value of `label`."""
        out: dict[str, float] = {}
        for labels, value in self.series(name, **match):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
        return out


def metrics_urls(environ: Mapping[str, str] | None = None) -> list[str]:
    """WALLETMIG_METRICS_URLS (comma-separated; `walletmig dev env` exports it)."""
    env = os.environ if environ is None else environ
    urls = [u.strip() for u in env.get("WALLETMIG_METRICS_URLS", "").split(",") if u.strip()]
    return urls[:URLS_MAX]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        body: bytes = response.read(SCRAPE_BODY_MAX_BYTES + 1)
    if len(body) > SCRAPE_BODY_MAX_BYTES:
        raise ValueError(f"more than {SCRAPE_BODY_MAX_BYTES} bytes")
    return body.decode("utf-8", "replace")


def scrape(urls: Sequence[str], fetch: Callable[[str], str] = _fetch) -> Scrape:
    """One round over `urls`; an endpoint that does not answer is an error, not a failure."""
    assert len(urls) <= URLS_MAX
    result = Scrape(at_s=time.monotonic())
    for url in urls:
        try:
            text = fetch(url)
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    result.add(sample.name, sample.labels, float(sample.value))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            result.errors[url] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def rate(now: Scrape, before: Scrape | None, name: str, **match: str) -> float | None:
    """Per second increase of a counter between two scrapes (None: no earlier scrape or not
    exported; a process restart, where the counter falls, reads as its new value)."""
    current = now.total(name, **match)
    if before is None or current is None:
        return None
    elapsed_s = now.at_s - before.at_s
    if elapsed_s <= 0:
        return None
    previous = before.total(name, **match) or 0.0
    increase = current - previous if current >= previous else current
    return increase / elapsed_s


def ratio_of_increase(now: Scrape, before: Scrape | None, part: tuple[str, Mapping[str, str]],
                      whole: tuple[str, Mapping[str, str]]) -> float | None:
    """increase(part) / increase(whole) between two scrapes; None when the whole did not move."""
    part_rate = rate(now, before, part[0], **part[1])
    whole_rate = rate(now, before, whole[0], **whole[1])
    if part_rate is None or not whole_rate:
        return None
    return part_rate / whole_rate


def mean_latency_s(now: Scrape, before: Scrape | None, histogram: str,
                   **match: str) -> float | None:
    """Mean of a histogram's observations between two scrapes (sum / count increases)."""
    return ratio_of_increase(now, before, (f"{histogram}_sum", match),
                             (f"{histogram}_count", match))


def sparkline(values: Iterable[float | None]) -> str:
    """One character per sample, scaled between the samples' min and max (blank: no data)."""
    points = list(values)
    known = [v for v in points if v is not None and not math.isnan(v)]
    if not known:
        return " " * len(points)
    low, high = min(known), max(known)
    span = high - low
    out: list[str] = []
    for value in points:
        if value is None or math.isnan(value):
            out.append(" ")
        elif span == 0:
            out.append(SPARK[0] if high == 0 else SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int((value - low) / span * len(SPARK)))])
    return "".join(out)


class Trend:
    """The last `size` samples of each named value, for the sparklines."""

    def __init__(self, size: int = TREND_SAMPLES_DEFAULT) -> None:
        assert 1 <= size <= 600
        self._size = size
        self._values: dict[str, deque[float | None]] = {}

    def push(self, name: str, value: float | None) -> str:
        """Record a sample; returns the trend line so far."""
        values = self._values.setdefault(name, deque(maxlen=self._size))
        values.append(value)
        return sparkline(values)


def fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 100:.4g}%"
