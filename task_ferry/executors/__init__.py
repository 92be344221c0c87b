"""Executors hand a job id to something that will call ``JobHandler.run_job`` on it."""
