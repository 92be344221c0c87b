"""Fan-out of the live event stream: many ``GET /api/jobs/<id>/events/`` on one uvicorn process.

Opens N concurrent SSE streams (session auth) on one job, then publishes a series of snapshots
through the progress store as a worker does (one every 50 ms, the default PUBLISH_INTERVAL),
the last one final. Prints whether every stream received every change in order, and the delay
from each publication to its arrival at the clients, for the final state and for all changes.

    python -m bench.api_sse [--streams 200] [--changes 20]

Needs PostgreSQL and Redis on 127.0.0.1 (creates and drops the database test_tf_bench_api).
The clients run in this process, on the same 2 cores as the server.
"""

import argparse
import asyncio
import json
import time

from bench.api_common import percentile, setup_django, throwaway_database


async def follow(
    client, url: str, headers: dict[str, str], connected: asyncio.Event, counter: list[int]
) -> list[tuple[float, dict]]:
    """Read one stream until ``end``; the arrival time and data of every ``job`` event."""
    received: list[tuple[float, dict]] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, response.status_code
        assert response.headers["x-task-ferry-stream"] == "live"
        buffer = ""
        async for text in response.aiter_text():
            now = time.time()
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                if block.startswith("event: job"):
                    received.append((now, json.loads(block.split("data: ", 1)[1])))
                    if len(received) == 1:
                        counter[0] += 1
                        if counter[0] == counter[1]:
                            connected.set()
                elif block.startswith("event: end"):
                    return received
    return received


async def run(args, base: str, job, headers: dict[str, str], store) -> None:
    import httpx

    from task_ferry.snapshot import job_snapshot

    url = f"{base}/api/jobs/{job.pk}/events/"
    connected = asyncio.Event()
    counter = [0, args.streams]
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        began = time.monotonic()
        tasks = [
            asyncio.create_task(follow(client, url, headers, connected, counter))
            for _ in range(args.streams)
        ]
        await asyncio.wait_for(connected.wait(), 120)
        print(f"{args.streams} streams open in {time.monotonic() - began:.2f} s")
        await asyncio.sleep(0.5)

        published: list[tuple[float, int]] = []
        base_snapshot = job_snapshot(job)
        for i in range(1, args.changes + 1):
            snapshot = dict(base_snapshot)
            snapshot["progress_percentage"] = round(i * 100 / args.changes)
            snapshot["progress_state"] = f"step {i} of {args.changes}"
            if i == args.changes:
                snapshot["state"] = "finished"
            published.append((time.time(), snapshot["progress_percentage"]))
            store.write(job.pk, snapshot)
            await asyncio.sleep(args.interval)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)

    expected = [p for _, p in published]
    complete = 0
    final_delays: list[float] = []
    all_delays: list[float] = []
    for received in results:
        changes = received[1:]  # the first event is the state at connection
        if [d["progress_percentage"] for _, d in changes] == expected:
            complete += 1
        by_percentage = {d["progress_percentage"]: t for t, d in changes}
        for published_at, percentage in published:
            if percentage in by_percentage:
                all_delays.append(by_percentage[percentage] - published_at)
        if changes and changes[-1][1]["state"] == "finished":
            final_delays.append(changes[-1][0] - published[-1][0])

    def figures(delays: list[float]) -> str:
        return (
            f"p50 {percentile(delays, 0.5) * 1e3:6.1f} ms, p99 {percentile(delays, 0.99) * 1e3:6.1f}"
            f" ms, max {max(delays) * 1e3:6.1f} ms"
        )

    print(f"changes published: {len(expected)}, {args.interval * 1e3:.0f} ms apart")
    print(
        f"streams that got every change, in order: {complete}/{len(results)} "
        f"-> every stream got every change: {complete == len(results)}"
    )
    print(f"final state arrived on {len(final_delays)}/{len(results)} streams")
    print(f"final state, publication to arrival: {figures(final_delays)}  (target max <= 100 ms)")
    print(f"all changes, publication to arrival: {figures(all_delays)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between changes")
    args = parser.parse_args()

    setup_django()
    from django.contrib.auth import get_user_model

    from task_ferry.handler import JobHandler, publish, transition
    from task_ferry.models import JobState
    from task_ferry.stores.base import get_store
    from tests.api.live import session_headers, uvicorn_server

    with throwaway_database():
        user = get_user_model().objects.create_user("follower")
        headers = session_headers(user)
        job = JobHandler.create_and_start(user, "export_table", table_id=42)
        transition(job, JobState.STARTED, from_states=[JobState.PENDING])
        publish(job)
        # One user follows the job from every stream: no limit on a user's streams here.
        with uvicorn_server(TASK_FERRY_TEST_SSE_MAX_STREAMS_PER_USER="none") as base:
            asyncio.run(run(args, base, job, headers, get_store()))


if __name__ == "__main__":
    main()
