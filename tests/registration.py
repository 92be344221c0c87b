"""Job types registered for one test only, by a fixture: how the tests add a type that the
test project's apps do not define."""

import pytest

from task_ferry.registry import job_type_registry
from tests.testapp.job_types import RecordingJobType
from tests.testapp.models import LinkedJob


class LinkedJobType(RecordingJobType[LinkedJob]):
    type = "linked"
    model_class = LinkedJob

    def run(self, job, progress):
        progress.increment(100)


def registered_for_the_test(job_type_class):
    """A fixture that registers ``job_type_class`` for the test and unregisters it after."""

    @pytest.fixture
    def job_type():
        registered = job_type_registry.register(job_type_class)
        yield registered
        job_type_registry.unregister(registered)

    return job_type
