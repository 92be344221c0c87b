"""What the job API shows of an export: its inputs and a download link, never its file's path."""

from rest_framework import serializers

from .models import ExportJob


class ExportJobSerializer(serializers.ModelSerializer):
    # The server's file layout stays on the server: clients get a URL to fetch the file from.
    download_url = serializers.CharField(
        read_only=True, allow_null=True, help_text="Null until the export has finished."
    )

    class Meta:
        model = ExportJob
        fields = ["rows", "seconds", "fail_at_row", "output_size", "download_url"]
        read_only_fields = ["output_size"]
