"""The simulation's core scheduler: never more tasks at once than cores, a round's tasks
longest-expected first, and nothing a hostile server names grows without bound. A fake clock
decides durations and the gathering window, so no test depends on this machine's speed."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fedgate.executor.cores import KEYS_KEPT, CoreScheduler

DEMO_TRAIN_S = {"hospital-0": 3.4, "hospital-1": 4.5, "hospital-2": 1.0, "hospital-3": 2.9, "hospital-4": 6.9}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler(cores: int, clock: FakeClock) -> CoreScheduler:
    """No gathering window: tasks queued behind busy cores are compared when one frees."""
    return CoreScheduler(cores, gather_s=0.0, clock=clock)


def learn(cores: CoreScheduler, clock: FakeClock, durations: dict[str, float], kind: str = "train") -> None:
    """One task per hospital, each taking its duration on the fake clock."""
    for hospital, seconds in durations.items():
        with cores.task(hospital, kind):
            clock.now += seconds


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if condition():
            return
        threading.Event().wait(0.001)
    pytest.fail("the condition never held")


def order_served(cores: CoreScheduler, clock: FakeClock, hospitals: list[str], kind: str = "train") -> list[str]:
    """Hold every core, let `hospitals` queue (in this order), free the cores, and return the
    order in which their tasks got one."""
    served: list[str] = []
    lock = threading.Lock()
    release = threading.Event()
    holding = threading.Barrier(cores.cores + 1)

    def hold() -> None:
        with cores.task("blocker", "hold"):
            holding.wait()
            release.wait()

    def run(hospital: str) -> None:
        with cores.task(hospital, kind), lock:
            served.append(hospital)

    blockers = [threading.Thread(target=hold) for _ in range(cores.cores)]
    for thread in blockers:
        thread.start()
    holding.wait()
    threads = []
    for hospital in hospitals:
        threads.append(threading.Thread(target=run, args=(hospital,)))
        threads[-1].start()
        queued = len(threads)
        wait_until(lambda queued=queued: cores.waiting == queued)  # each in line before the next arrives
    release.set()
    for thread in [*blockers, *threads]:
        thread.join()
    return served


def test_a_rounds_tasks_get_a_core_longest_expected_first() -> None:
    clock = FakeClock()
    cores = scheduler(1, clock)
    learn(cores, clock, DEMO_TRAIN_S)
    served = order_served(cores, clock, sorted(DEMO_TRAIN_S))  # they arrive in partition order
    assert served == ["hospital-4", "hospital-1", "hospital-0", "hospital-3", "hospital-2"]


def test_tasks_never_seen_before_keep_their_order_of_arrival() -> None:
    clock = FakeClock()
    cores = scheduler(1, clock)
    arrival = ["hospital-3", "hospital-0", "hospital-4", "hospital-1"]
    assert order_served(cores, clock, arrival) == arrival


def test_each_kind_of_message_is_expected_from_its_own_history() -> None:
    """The largest hospital evaluates quickly; its next training is still expected to be long."""
    clock = FakeClock()
    cores = scheduler(1, clock)
    learn(cores, clock, DEMO_TRAIN_S, kind="train")
    learn(cores, clock, {"hospital-4": 0.1, "hospital-2": 0.5}, kind="evaluate")
    assert cores.expected("hospital-4", "train") == pytest.approx(6.9)
    assert order_served(cores, clock, ["hospital-2", "hospital-4"], kind="train") == ["hospital-4", "hospital-2"]
    assert order_served(cores, clock, ["hospital-4", "hospital-2"], kind="evaluate") == ["hospital-2", "hospital-4"]


def test_the_tasks_of_a_round_are_compared_after_they_have_all_arrived() -> None:
    """A free core is not given to the first task of a round before the gathering window ends:
    the longer task that arrives a moment later goes first. (The fake clock stands still until
    the test moves it; waiters look at it again every 0.01 s.)"""
    clock = FakeClock()
    cores = CoreScheduler(1, gather_s=0.01, clock=clock)
    served: list[str] = []

    def run(hospital: str, inside: threading.Event | None = None, finish: threading.Event | None = None) -> None:
        with cores.task(hospital, "train"):
            served.append(hospital)
            if inside and finish:
                inside.set()
                finish.wait()

    for hospital, seconds in (("short", 1.0), ("long", 5.0)):  # learn: each alone, held for its time
        inside, finish = threading.Event(), threading.Event()
        thread = threading.Thread(target=run, args=(hospital, inside, finish))
        thread.start()
        wait_until(lambda: cores.waiting == 1)  # in line, and kept there by the window
        clock.now += 1.0
        inside.wait()
        clock.now += seconds
        finish.set()
        thread.join()
    assert cores.expected("long", "train") == pytest.approx(5.0)
    served.clear()
    first = threading.Thread(target=run, args=("short",))
    first.start()
    wait_until(lambda: cores.waiting == 1)
    second = threading.Thread(target=run, args=("long",))
    second.start()
    wait_until(lambda: cores.waiting == 2)
    clock.now += 1.0  # the window ends
    first.join()
    second.join()
    assert served == ["long", "short"]


@pytest.mark.parametrize("n_cores", [1, 2, 3])
def test_never_more_tasks_at_once_than_cores(n_cores: int) -> None:
    cores = CoreScheduler(n_cores, gather_s=0.0)
    running = peak = 0
    lock = threading.Lock()

    def run(index: int) -> None:
        nonlocal running, peak
        with cores.task(f"hospital-{index % 7}", "train"):
            with lock:
                running += 1
                peak = max(peak, running)
            threading.Event().wait(0.002)
            with lock:
                running -= 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == n_cores and running == 0 and cores.waiting == 0


def test_a_task_that_fails_frees_its_core_and_is_remembered() -> None:
    clock = FakeClock()
    cores = scheduler(1, clock)
    with pytest.raises(RuntimeError), cores.task("hospital-0", "train"):
        clock.now += 2.0
        raise RuntimeError("the task failed")
    assert cores.expected("hospital-0", "train") == pytest.approx(2.0)
    clock.now += 1.0
    with cores.task("hospital-1", "train"):  # the core is free again
        pass


def test_a_servers_invented_message_types_are_forgotten_past_a_bound() -> None:
    clock = FakeClock()
    cores = scheduler(1, clock)
    learn(cores, clock, {"hospital-4": 6.9})
    for index in range(KEYS_KEPT + 50):
        learn(cores, clock, {"hospital-0": 0.1}, kind=f"query.t{index}" + "x" * 500)
    assert cores.remembered <= KEYS_KEPT
    assert cores.expected("hospital-4", "train") == 0.0  # the oldest entry aged out
    assert cores.expected("hospital-0", f"query.t{KEYS_KEPT + 49}" + "x" * 500) == pytest.approx(0.1)


def test_at_least_one_core() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CoreScheduler(0)
