"""The progress store on Django's cache framework."""

import shutil

import pytest
from django.core.management import call_command

from task_ferry.stores.cache import DELETE_BATCH_KEYS, CacheProgressStore


@pytest.fixture
def database_cache(db, settings):
    """A database cache, as a project without Redis shares one between its web and worker
    processes. Its table goes with the test's transaction."""
    settings.CACHES = {
        **settings.CACHES,
        "jobs": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "task_ferry_test_cache",
        },
    }
    call_command("createcachetable", "--database", "default", verbosity=0)
    return CacheProgressStore(timeout=600, key_prefix="tf-test-cache", alias="jobs")


def test_deleting_more_jobs_than_a_statement_takes_parameters_forgets_each(database_cache):
    """Every key of a delete went to one ``delete_many()``, which the database cache sends as
    one statement: past SQLite's limit of parameters (32,766 by default, 250,000 in Debian's
    build; PostgreSQL's is 65,535 with server-side binding) the database refused it, and the
    store forgot none of the jobs. Two keys a job: 130,000 jobs are past every limit."""
    store = database_cache
    job_ids = list(range(1, 130_001))
    kept = [*job_ids[::10_000], job_ids[-1]]
    store.write_many({job_id: {"id": job_id, "state": "started"} for job_id in kept})
    store.request_cancel(job_ids[-1], "token")
    assert len(store.read_many(kept)) == len(kept)
    store.delete(job_ids)
    assert store.read_many(kept) == {}
    assert store.cancel_requests(job_ids[-1:]) == {}


def test_the_fallback_write_if_absent_says_whether_it_stored(db):
    """``ProgressStore.write_if_absent()`` as a store that does not override it has it."""
    from task_ferry.stores.base import ProgressStore

    class ReadThenWrite(CacheProgressStore):
        write_if_absent = ProgressStore.write_if_absent

    store = ReadThenWrite(timeout=600, key_prefix="tf-test-fallback", alias="default")
    assert store.write_if_absent(1, {"id": 1, "state": "pending"}) is True
    assert store.write_if_absent(1, {"id": 1, "state": "started"}) is False
    assert store.read(1) == {"id": 1, "state": "pending"}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_a_delete_cut_short_by_the_cache_going_away_says_which_jobs_it_did_not_forget(
    redis_server,
    settings,
    monkeypatch,
):
    """Django's Redis cache went away after the first batch of a delete: the store stopped
    there, and said it had forgotten none of the jobs, though the first batch's were."""
    from django.core.cache.backends.redis import RedisCache

    from task_ferry.exceptions import SnapshotsNotForgotten

    settings.CACHES = {
        **settings.CACHES,
        "jobs": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_server.url,
        },
    }
    store = CacheProgressStore(timeout=600, key_prefix="tf-test-cache", alias="jobs")
    jobs_per_batch = DELETE_BATCH_KEYS // 2
    job_ids = list(range(1, 2 * jobs_per_batch + 8))
    store.write_many({i: {"id": i, "state": "started"} for i in job_ids})
    delete_many = RedisCache.delete_many
    calls = []

    def delete_many_then_stop_redis(self, keys, version=None):
        delete_many(self, keys, version)
        calls.append(keys)
        if len(calls) == 1:
            redis_server.stop()

    monkeypatch.setattr(RedisCache, "delete_many", delete_many_then_stop_redis)
    with pytest.raises(SnapshotsNotForgotten) as raised:
        store.delete(job_ids)
    assert raised.value.job_ids == job_ids[jobs_per_batch:]
