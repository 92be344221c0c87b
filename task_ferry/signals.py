"""Signals sent after each job state change. Every one passes ``sender`` (the job's model
class) and ``job`` (the specific job instance); ``job_failed`` also passes ``exc``."""

from django.dispatch import Signal

job_created = Signal()
job_started = Signal()
job_finished = Signal()
job_failed = Signal()
job_cancelled = Signal()
