"""A small parser for the Prometheus text exposition format, and counter/histogram arithmetic.

Enough for what the load tester reads from `/metrics`: samples with labels, `# TYPE` lines,
counter deltas between two scrapes, and quantiles from histogram bucket deltas (the same
interpolation as PromQL's `histogram_quantile`). No dependency on prometheus_client.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
SampleKey = tuple[str, Labels]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(rf"^({_NAME})(\{{.*\}})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class ParseError(ValueError):
    pass


@dataclass
class Exposition:
    """One scrape: sample values keyed by (name, labels), and the declared type of each family."""

    samples: dict[SampleKey, float] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # family name -> counter|gauge|histogram|...

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def families(self) -> set[str]:
        """Family names: sample names with _total/_bucket/_sum/_count/_created folded per # TYPE."""
        out = set()
        for name in self.names():
            out.add(family_of(name, self.types))
        return out

    def get(self, name: str, **labels: str) -> float | None:
        key = (name, tuple(sorted(labels.items())))
        return self.samples.get(key)

    def sum(self, name: str, **match: str) -> float | None:
        """Sum of every sample called `name` whose labels include `match`; None if there is none."""
        vals = [
            v
            for (n, labels), v in self.samples.items()
            if n == name and all(dict(labels).get(k) == want for k, want in match.items())
        ]
        return sum(vals) if vals else None

    def type_of(self, sample_name: str) -> str | None:
        return self.types.get(family_of(sample_name, self.types))


def _unescape(value: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], value)


def _parse_labels(text: str) -> Labels:
    inner = text[1:-1].strip()
    labels = []
    pos = 0
    while pos < len(inner):
        m = _LABEL_RE.match(inner, pos)
        if not m:
            raise ParseError(f"bad label set {text!r}")
        labels.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
    return tuple(sorted(labels))


def _parse_value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)


def parse(text: str) -> Exposition:
    """Parse exposition text. Raises ParseError on a malformed sample line."""
    exp = Exposition()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                exp.types[parts[2]] = parts[3].strip()
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            raise ParseError(f"line {lineno}: cannot parse {raw!r}")
        name, label_text, value = m.group(1), m.group(2), m.group(3)
        try:
            labels = _parse_labels(label_text) if label_text else ()
            exp.samples[(name, labels)] = _parse_value(value)
        except ValueError as e:
            raise ParseError(f"line {lineno}: {e}") from e
    return exp


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def family_of(sample_name: str, types: dict[str, str]) -> str:
    """The family a sample belongs to: `adsa_x_bucket` -> `adsa_x` when `adsa_x` is a histogram."""
    if sample_name in types:
        return sample_name
    for suffixes_type, suffixes in _SUFFIXES.items():
        for suf in suffixes:
            if sample_name.endswith(suf):
                base = sample_name[: -len(suf)]
                if types.get(base) == suffixes_type:
                    return base
    return sample_name


def _is_monotonic(name: str, types: dict[str, str]) -> bool:
    fam = family_of(name, types)
    t = types.get(fam)
    if name.endswith("_created"):
        return False
    if t == "counter":
        return True
    if t in ("histogram", "summary"):
        return name.endswith(("_bucket", "_sum", "_count"))
    # untyped: go by the naming convention
    return t is None and name.endswith(("_total", "_bucket", "_count", "_sum"))


def counter_deltas(before: Exposition, after: Exposition) -> dict[SampleKey, float]:
    """after - before for every monotonic sample (counters, histogram/summary _bucket/_sum/_count).

    A sample missing before counts from 0; a decrease means the server restarted, and the delta
    is then the value after (what accumulated since the restart).
    """
    types = {**before.types, **after.types}
    out: dict[SampleKey, float] = {}
    for key, v_after in after.samples.items():
        if not _is_monotonic(key[0], types):
            continue
        v_before = before.samples.get(key, 0.0)
        out[key] = v_after - v_before if v_after >= v_before else v_after
    return out


def delta_sum(deltas: dict[SampleKey, float], name: str, **match: str) -> float | None:
    vals = [
        v
        for (n, labels), v in deltas.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    ]
    return sum(vals) if vals else None


def histogram_buckets(samples: dict[SampleKey, float], family: str) -> list[tuple[float, float]]:
    """Cumulative (upper_bound, count) pairs of `family`, summed over every other label, sorted."""
    acc: dict[float, float] = {}
    for (name, labels), v in samples.items():
        if name != family + "_bucket":
            continue
        le = dict(labels).get("le")
        if le is None:
            continue
        bound = _parse_value(le)
        acc[bound] = acc.get(bound, 0.0) + v
    return sorted(acc.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile on cumulative buckets: linear inside the bucket that holds rank q*N.

    None when there are no observations. A rank in the +Inf bucket returns the highest finite bound.
    """
    if not 0 <= q <= 1:
        raise ValueError("q must be within [0, 1]")
    if not buckets or buckets[-1][0] != math.inf:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            if (i == 0 and bound <= 0) or count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
