"""The benchmarks' stand-in worker, for use until an executor with its own worker is merged:
``RedisListExecutor`` pushes job ids to a Redis list; ``python -m bench.fastpath.worker`` pops
them and runs each with ``JobHandler.run_job``, one at a time, like a worker process."""

from __future__ import annotations

import os

import redis

from task_ferry.executors.base import BaseExecutor

QUEUE_KEY = "bench:queue"


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["TASK_FERRY_BENCH_REDIS_URL"])


class RedisListExecutor(BaseExecutor):
    def enqueue(self, job_id: int) -> None:
        _client().rpush(QUEUE_KEY, job_id)


def main() -> None:
    import django

    django.setup()
    from task_ferry.handler import JobHandler

    client = _client()
    while True:
        _key, job_id = client.blpop([QUEUE_KEY])
        JobHandler.run_job(int(job_id))


if __name__ == "__main__":
    main()
