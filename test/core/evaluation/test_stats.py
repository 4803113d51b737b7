import pytest

from mvreg_ros.core.evaluation import stats


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    assert stats.median([1, 2, 3, 10]) == 2.5  # torch.median would say 2.0
    assert stats.median([3, 1, 2]) == 2.0
    assert stats.median([]) is None
    assert stats.median(x for x in (4.0, 1.0)) == 2.5  # any iterable


def test_percentile_interpolates_and_checks_q():
    assert stats.percentile([0, 10], 95) == pytest.approx(9.5)
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError, match="101"):
        stats.percentile([1.0], 101)


def test_summary():
    assert stats.summary([1, 2, 3, 10]) == {"n": 4, "mean": 4.0, "median": 2.5, "p95": pytest.approx(8.95)}
    assert stats.summary([]) == {"n": 0, "mean": None, "median": None, "p95": None}
    with pytest.raises(TypeError):
        stats.summary([[1, 2]])
