"""Tick cost: a real job run doing 20,000 ``child.increment(state=f"row {i}")``.

    make bench-fastpath            # or: python -m bench.ticks [--ticks N] [--runs N]

Runs the job through ``JobHandler.create_and_start`` with the immediate executor (the runner,
the monitor, the Redis store on a private redis-server, PostgreSQL), and prints the cost per
tick amortised over the whole run, start and end included, next to the cost of calling an
empty method the same way; and the Redis commands the run sent, per tick.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.fastpath.common import CommandCounter, bench_user, load_note, setup


class Empty:
    __slots__ = ()

    def increment(self, by: float = 1, state: str | None = None) -> None:
        pass


def loop_cost(target: object, ticks: int) -> float:
    """Seconds per tick of the benchmark's loop calling ``target.increment``."""
    increment = target.increment  # type: ignore[attr-defined]
    start = time.perf_counter()
    for i in range(ticks):
        increment(state=f"row {i}")
    return (time.perf_counter() - start) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    url = setup()

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job
    from task_ferry.progress import Progress

    user = bench_user()
    counter = CommandCounter(url)
    ticks = args.ticks

    def run_job(steps: int) -> tuple[float, int]:
        before = counter.total()
        start = time.perf_counter()
        job = JobHandler.create_and_start(user, "bench_ticks", steps=steps)
        elapsed = time.perf_counter() - start
        commands = counter.total() - before
        assert job.state == "finished", job.state
        return elapsed, commands

    # Warm up: imports, connections, the monitor thread and its subscription.
    run_job(ticks)
    run_job(0)
    empty_runs, job_runs, bare_runs, floor_runs, commands = [], [], [], [], []
    for _ in range(args.runs):
        floor_runs.append(loop_cost(Empty(), ticks))
        bare_runs.append(loop_cost(Progress().create_child(represents=100, total=ticks), ticks))
        elapsed, count = run_job(ticks)
        job_runs.append(elapsed)
        commands.append(count)
        empty_runs.append(run_job(0)[0])
    Job.objects.filter(user=user).delete()

    floor = statistics.median(floor_runs)
    bare = statistics.median(bare_runs)
    run = statistics.median(job_runs)
    empty = statistics.median(empty_runs)
    print(load_note())
    print(f"tick cost, {ticks} ticks, median of {args.runs} runs (best in brackets):")
    print(
        f"  empty method floor (loop + f-string + call)  {floor * 1e6:6.3f} us/tick "
        f"[{min(floor_runs) * 1e6:.3f}]"
    )
    print(
        f"  Progress.increment, no job                   {bare * 1e6:6.3f} us/tick "
        f"[{min(bare_runs) * 1e6:.3f}]"
    )
    print(
        f"  whole job run / ticks (target <= 1 us)       {run / ticks * 1e6:6.3f} us/tick "
        f"[{min(job_runs) / ticks * 1e6:.3f}]"
    )
    print(
        f"    of which start + end (a 0-tick job run)    {empty * 1e3:6.2f} ms "
        f"[{min(empty_runs) * 1e3:.2f}]"
    )
    print(
        f"  Redis commands per run                       {statistics.median(commands):6.0f} "
        f"[max {max(commands)}]"
    )
    print(
        f"  Redis commands per tick (target <= 0.01)     {max(commands) / ticks:8.5f} (worst run)"
    )


if __name__ == "__main__":
    main()
