"""The open-loop arrival schedule: Poisson rate within tolerance, bounded by count and by time."""

import random
import statistics

import pytest

from loadtest.schedule import poisson_arrivals, uniform_arrivals


def test_mean_rate_within_tolerance():
    # 20 000 arrivals at 50/s: the realised rate n / T_n has relative sd 1/sqrt(n) ~ 0.7 %
    offs = poisson_arrivals(50.0, 20_000, 1e9, random.Random(1))
    assert len(offs) == 20_000
    assert len(offs) / offs[-1] == pytest.approx(50.0, rel=0.03)


def test_gaps_are_exponential():
    offs = poisson_arrivals(10.0, 10_000, 1e9, random.Random(2))
    gaps = [b - a for a, b in zip([0.0, *offs], offs, strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.05)  # CV of an exponential is 1
    # P(gap > mean) = e^-1
    assert sum(g > 0.1 for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.02)
    assert all(g > 0 for g in gaps)


def test_bounded_by_count():
    offs = poisson_arrivals(100.0, 10, 3600.0, random.Random(3))
    assert len(offs) == 10


def test_bounded_by_time():
    offs = poisson_arrivals(100.0, 1_000_000, 2.0, random.Random(4))
    assert offs and max(offs) < 2.0
    assert len(offs) == pytest.approx(200, rel=0.25)  # ~ rate * duration


def test_deterministic_for_a_seed():
    assert poisson_arrivals(5, 50, 100, random.Random(7)) == poisson_arrivals(5, 50, 100, random.Random(7))
    assert poisson_arrivals(5, 50, 100, random.Random(7)) != poisson_arrivals(5, 50, 100, random.Random(8))


@pytest.mark.parametrize("args", [(0, 10, 1.0), (-1, 10, 1.0), (1, -1, 1.0), (1, 10, 0.0)])
def test_rejects_bad_bounds(args):
    with pytest.raises(ValueError):
        poisson_arrivals(*args, rng=random.Random(0))


def test_uniform():
    assert uniform_arrivals(2.0, 10, 2.0) == [0.5, 1.0, 1.5]
    assert uniform_arrivals(2.0, 2, 100.0) == [0.5, 1.0]
