from __future__ import annotations

from typing import Any

from rest_framework import serializers

from task_ferry.models import Job


class JobSerializer(serializers.ModelSerializer[Job]):
    """The poll response: the same keys as a progress-store snapshot."""

    class Meta:
        model = Job
        fields = [
            "id",
            "type",
            "state",
            "progress_percentage",
            "progress_state",
            "error",
            "human_readable_error",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class JobCreateSerializer(serializers.Serializer[Any]):
    type = serializers.CharField(help_text="The job type's name, e.g. 'export_table'.")
