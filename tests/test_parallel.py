"""Ordered thread map: results in order, errors at their turn, bounded look-ahead, early exit."""

import pytest

from normdino.parallel import MAX_WORKERS, default_workers, ordered_map


def _square_after_work(n: int) -> int:
    """n * n after an uneven amount of work, so that threads finish out of order."""
    assert sum(range((n * 7919) % 5000)) >= 0
    return n * n


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_results_come_in_input_order(workers):
    assert list(ordered_map(_square_after_work, range(50), workers)) == [n * n for n in range(50)]


@pytest.mark.parametrize("workers", [0, 3])
def test_an_error_surfaces_at_its_turn_after_the_items_before_it(workers):
    def fail_at_five(n):
        if n == 5:
            raise ValueError("item 5 is broken")
        return n

    seen = []
    with pytest.raises(ValueError, match="item 5"):
        for value in ordered_map(fail_at_five, range(10), workers):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def test_look_ahead_is_bounded_and_an_early_stop_pulls_no_more():
    pulled = []

    def source():
        for n in range(100):
            pulled.append(n)
            yield n

    results = ordered_map(lambda n: n, source(), workers=2, ahead=3)
    assert next(results) == 0 and len(pulled) <= 1 + 3
    assert next(results) == 1 and len(pulled) <= 2 + 3
    results.close()
    assert len(pulled) <= 2 + 3
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_source_yields_the_results_before_it_first(workers):
    def source():
        yield from range(4)
        raise OSError("the stream broke after 4 items")

    seen = []
    with pytest.raises(OSError, match="after 4 items"):
        for value in ordered_map(lambda n: n * 10, source(), workers, ahead=8):
            seen.append(value)
    assert seen == [0, 10, 20, 30]


def test_default_workers_feed_a_gpu_and_leave_a_cpu_model_its_cores():
    assert default_workers("cpu") == 1
    assert 1 <= default_workers("cuda:0") <= MAX_WORKERS
