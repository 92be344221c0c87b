"""progress.track() used the way a job type uses it."""

import pytest

from task_ferry.handler import JobHandler
from task_ferry.models import JobState
from task_ferry.registry import JobType, job_type_registry
from tests.testapp.models import ScriptedJob


class TrackingJobType(JobType):
    """Two stages of half the job each: a list, then a generator, both walked with track()."""

    type = "tracking"
    model_class = ScriptedJob
    seen: list[tuple[str, int]] = []

    def run(self, job, progress):
        rows = list(range(job.steps))
        # The total given here is replaced by len(rows) when track() starts.
        copy = progress.create_child(represents=50, total=1)
        for row in copy.track(rows, state="copying"):
            self.seen.append(("copy", progress.percentage))
            assert progress.state == ("copying" if row else "")
        stage = progress.create_child(represents=50, total=4)
        for _ in stage.track((i for i in range(4)), state="indexing"):
            self.seen.append(("index", progress.percentage))
        job.result = f"{progress.percentage}% {progress.state}"
        job.save(update_fields=["result"])


@pytest.fixture
def tracking_type():
    TrackingJobType.seen = []
    job_type_registry.register(TrackingJobType)
    yield TrackingJobType
    job_type_registry.unregister("tracking")


def test_track_counts_items_and_len_sets_the_total(db, user, tracking_type):
    job = JobHandler.create_and_start(user, "tracking", steps=8)
    assert job.state == JobState.FINISHED
    # len() of the list set the first stage's total to 8: each item is 1/8 of half the job,
    # counted once the loop body is done with it.
    assert tracking_type.seen[:8] == [("copy", p) for p in (0, 6, 12, 18, 25, 31, 37, 43)]
    # A generator has no len(): the second stage keeps the total it was created with.
    assert tracking_type.seen[8:] == [
        ("index", 50),
        ("index", 62),
        ("index", 75),
        ("index", 87),
    ]
    job.refresh_from_db()
    assert job.result == "100% indexing"
    assert job.progress_percentage == 100
    assert job.progress_state == "indexing"
