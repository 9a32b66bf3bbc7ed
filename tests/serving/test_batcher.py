"""The model worker: requests that wait together run as one batch, per key, each getting its own outputs;
a full worker refuses at once; a failing batch fails its requests only, and the worker goes on."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmfusion.errors import UserError
from mmfusion.serving.batcher import Busy, ModelWorker


class Recorder:
    """A model call that records the batches it gets and is held until released."""

    def __init__(self):
        self.batches = []
        self.release = threading.Event()

    def __call__(self, items):
        self.release.wait(10)
        self.batches.append(list(items))
        return [f"out-{x}" for x in items]


def wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_waiting_requests_of_one_key_run_as_one_batch_and_get_their_own_outputs():
    worker, run = ModelWorker(max_batch=8, gather_seconds=0), Recorder()
    blocker = Recorder()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(worker.submit, "other", ["x"], blocker)  # holds the worker while the rest queue
        wait_for(lambda: worker._running == 1)
        futures = [pool.submit(worker.submit, "a", [f"{i}.0", f"{i}.1"], run) for i in range(3)]
        odd = pool.submit(worker.submit, "b", ["b0"], run)
        wait_for(lambda: len(worker._jobs) == 4)
        blocker.release.set()
        run.release.set()
        results = [f.result(10) for f in futures]
        assert first.result(10) == ["out-x"] and odd.result(10) == ["out-b0"]
    assert results == [[f"out-{i}.0", f"out-{i}.1"] for i in range(3)]
    # the three "a" requests in one call, in arrival order; "b" apart
    assert run.batches == [["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"], ["b0"]]
    assert worker.stats.requests == 5 and worker.stats.batches == 3 and worker.stats.largest_batch == 6
    worker.close()


def test_a_batch_holds_at_most_max_batch_samples():
    worker, run, blocker = ModelWorker(max_batch=4, gather_seconds=0), Recorder(), Recorder()
    run.release.set()
    with ThreadPoolExecutor(6) as pool:
        pool.submit(worker.submit, "other", ["x"], blocker)
        wait_for(lambda: worker._running == 1)
        futures = [pool.submit(worker.submit, "a", [i, i], run) for i in range(3)]
        wait_for(lambda: len(worker._jobs) == 3)
        blocker.release.set()
        assert [f.result(10) for f in futures] == [[f"out-{i}", f"out-{i}"] for i in range(3)]
    assert [len(b) for b in run.batches] == [4, 2]
    worker.close()


def test_past_max_pending_a_request_is_refused_at_once():
    worker, blocker = ModelWorker(max_pending=2, gather_seconds=0), Recorder()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(worker.submit, "a", [i], blocker) for i in range(2)]
        wait_for(lambda: worker._running + len(worker._jobs) == 2)
        start = time.monotonic()
        with pytest.raises(Busy, match="busy: 2 requests"):
            worker.submit("a", [9], blocker)
        assert time.monotonic() - start < 1.0
        blocker.release.set()
        assert [f.result(10) for f in held] == [["out-0"], ["out-1"]]
    assert worker.submit("a", [3], blocker) == ["out-3"]  # room again
    worker.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    worker = ModelWorker(gather_seconds=0)

    def broken(items):
        raise UserError("the model refused")

    with pytest.raises(UserError, match="the model refused"):
        worker.submit("a", [1], broken)
    with pytest.raises(RuntimeError, match="a batch of 2 items gave 1 outputs"):
        worker.submit("a", [1, 2], lambda items: ["one"])
    assert worker.submit("a", [5], lambda items: [x * 2 for x in items]) == [10]
    worker.close()
    with pytest.raises(UserError, match="shutting down"):
        worker.submit("a", [1], lambda items: items)


def test_the_next_batch_waits_briefly_for_as_many_samples_as_the_last():
    """People just served send their next request at once: after a batch of 3, the worker waits (up to
    `gather_seconds`, and no longer than that batch ran) until 3 samples wait again, rather than running
    the first one alone."""
    worker, run = ModelWorker(max_batch=8, gather_seconds=2.0), Recorder()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(worker.submit, "a", [1, 2, 3], run)
        time.sleep(0.6)  # the batch of 3 runs this long: the next may wait as long for its people
        run.release.set()
        assert first.result(10) == ["out-1", "out-2", "out-3"]
        futures = [pool.submit(worker.submit, "a", [10], run)]
        time.sleep(0.2)  # inside both windows
        futures += [pool.submit(worker.submit, "a", [i], run) for i in (11, 12)]
        assert [f.result(10) for f in futures] == [["out-10"], ["out-11"], ["out-12"]]
    assert [sorted(b) for b in run.batches] == [[1, 2, 3], [10, 11, 12]]
    worker.close()


def test_requests_that_came_while_a_batch_ran_count_toward_the_next():
    """Eight steady clients make batches of 8: after a batch of 5, with 3 more waiting, the worker waits
    for the 5 to come back rather than for 5 samples in all (which kept such clients in batches of 5 and
    3, or 6 and 2, for as long as they kept coming)."""
    worker, run = ModelWorker(max_batch=8, gather_seconds=2.0), Recorder()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(worker.submit, "a", [0, 1, 2, 3, 4], run)
        wait_for(lambda: worker._running == 1)
        early = [pool.submit(worker.submit, "a", [i], run) for i in (5, 6, 7)]
        wait_for(lambda: len(worker._jobs) == 3)
        time.sleep(0.5)  # the batch runs this long
        run.release.set()
        first.result(10)
        late = []
        for i in range(10, 15):  # the five come back one after another
            late.append(pool.submit(worker.submit, "a", [i], run))
            time.sleep(0.02)
        assert [f.result(10) for f in early + late] == [[f"out-{i}"] for i in (5, 6, 7, *range(10, 15))]
    assert [len(b) for b in run.batches] == [5, 8]
    worker.close()


def test_the_wait_for_a_fuller_batch_is_no_longer_than_the_last_batch_ran():
    """A batch that ran for 10 ms is not worth 2 s of waiting: the last people of a crowd, or one person
    after it, are served about as soon as the model is free."""
    worker = ModelWorker(max_batch=8, gather_seconds=2.0)
    assert worker.submit("a", list(range(8)), lambda items: items) == list(range(8))
    start = time.monotonic()
    assert worker.submit("a", [9], lambda items: items) == [9]  # alone, where 8 would have been waited for
    assert time.monotonic() - start < 1.0
    worker.close()
