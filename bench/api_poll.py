"""Cost of polling ``GET /api/jobs/<id>/`` for a live job, against a bare DRF view.

Both go through the full Django stack (session and auth middleware, DRF session
authentication) in this process; the baseline then does one Redis GET and returns the bytes.
Rounds alternate between the two, and the ratio of their median round times is printed.

    python -m bench.api_poll [--requests 100] [--rounds 60]

Needs PostgreSQL and Redis on 127.0.0.1 (creates and drops the database test_tf_bench_api).
"""

import argparse
import statistics
import time

from bench.api_common import percentile, setup_django, throwaway_database


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100, help="requests per round")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of each kind")
    args = parser.parse_args()

    setup_django()
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client, override_settings
    from django.test.utils import CaptureQueriesContext

    from task_ferry.handler import JobHandler, publish, transition
    from task_ferry.models import JobState

    with throwaway_database(), override_settings(ROOT_URLCONF="bench.urls"):
        user = get_user_model().objects.create_user("poller")
        client = Client()
        client.force_login(user)
        job = JobHandler.create_and_start(user, "export_table", table_id=42)
        transition(job, JobState.STARTED, from_states=[JobState.PENDING])
        job.progress_percentage, job.progress_state = 43, "Writing row 430..."
        publish(job)

        api_url, bare_url = f"/api/jobs/{job.pk}/", f"/bare/{job.pk}/"
        for url in (api_url, bare_url):
            response = client.get(url)
            assert response.status_code == 200, (url, response.content)
        assert client.get(api_url).json()["progress_percentage"] == 43

        with CaptureQueriesContext(connection) as queries:
            client.get(api_url)
        poll_queries = [q["sql"] for q in queries.captured_queries]
        job_queries = [sql for sql in poll_queries if "task_ferry_job" in sql]

        def round_time(url: str) -> float:
            began = time.perf_counter()
            for _ in range(args.requests):
                client.get(url)
            return (time.perf_counter() - began) / args.requests

        for url in (api_url, bare_url):  # warm-up
            round_time(url)
        api_times, bare_times = [], []
        for i in range(args.rounds):
            order = (api_url, bare_url) if i % 2 == 0 else (bare_url, api_url)
            for url in order:
                (api_times if url == api_url else bare_times).append(round_time(url))

    api, bare = statistics.median(api_times), statistics.median(bare_times)
    print(f"requests: {args.rounds} rounds x {args.requests} per kind, session auth on PostgreSQL")
    print(
        f"bare DRF view (auth + 1 Redis GET): median {bare * 1e6:7.1f} us/request "
        f"(p90 of rounds {percentile(bare_times, 0.9) * 1e6:.1f})"
    )
    print(
        f"task_ferry detail (live job)      : median {api * 1e6:7.1f} us/request "
        f"(p90 of rounds {percentile(api_times, 0.9) * 1e6:.1f})"
    )
    print(f"ratio detail / bare: {api / bare:.3f}  (target <= 1.15)")
    print(f"ratio of the fastest rounds: {min(api_times) / min(bare_times):.3f}")
    print(f"queries per detail request: {len(poll_queries)} ({len(job_queries)} on job tables)")


if __name__ == "__main__":
    main()
