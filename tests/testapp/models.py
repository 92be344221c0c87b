from django.db import models

from task_ferry.models import Job


class ScriptedJob(Job):
    """A job whose behaviour the test chooses through its fields."""

    steps = models.PositiveIntegerField(default=10)
    # Seconds to sleep before each tick.
    tick_delay = models.FloatField(default=0)
    # Raise RuntimeError at this step (0-based); None never fails.
    fail_at = models.IntegerField(null=True, blank=True)
    # Seconds to block without ticking before the first step (a long C call, say).
    block_for = models.FloatField(default=0)
    # Lock this job's row (SELECT ... FOR UPDATE) inside the job's transaction first.
    lock_own_row = models.BooleanField(default=False)
    # Id of a Marker row to create inside the job's transaction, to observe rollbacks.
    marker = models.CharField(max_length=100, blank=True)
    result = models.CharField(max_length=100, blank=True)


class LimitedJob(Job):
    label = models.CharField(max_length=100, blank=True)


class ReservationJob(Job):
    """Own fields the database keeps unique: a code, and a room per day."""

    code = models.CharField(max_length=20, unique=True)
    room = models.CharField(max_length=20, blank=True)
    day = models.IntegerField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "day"], name="testapp_room_day")]


class Marker(models.Model):
    """Written by jobs inside their transaction; survives only if the job committed."""

    name = models.CharField(max_length=100)


class HookCall(models.Model):
    """One row per hook call, so tests can count calls across processes."""

    job_id = models.BigIntegerField()
    hook = models.CharField(max_length=50)
    detail = models.TextField(blank=True)


class LinkedJob(Job):
    """A job with a foreign key of its own, and rows that keep it from being deleted."""

    marker = models.ForeignKey(
        Marker, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    details = models.JSONField(null=True, blank=True)
    markers = models.ManyToManyField(Marker, blank=True, related_name="+")
    # Links through a model of the project's: Django adds them with a plain INSERT.
    tags = models.ManyToManyField(Marker, blank=True, through="Tagging", related_name="+")
    # A key to a proxy: it takes rows of the proxy's concrete model too.
    follows = models.ForeignKey(
        "ScriptedJobProxy", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )


class Tagging(models.Model):
    """The link of a job to one of its tags."""

    job = models.ForeignKey(LinkedJob, on_delete=models.CASCADE, related_name="+")
    marker = models.ForeignKey(Marker, on_delete=models.CASCADE, related_name="+")


class Receipt(models.Model):
    """Keeps the job it records: it cannot be deleted while the receipt exists."""

    job = models.ForeignKey(LinkedJob, on_delete=models.PROTECT, related_name="+")


class Attachment(models.Model):
    """Deleted with its job."""

    job = models.ForeignKey(LimitedJob, on_delete=models.CASCADE, related_name="+")


class AttachmentReceipt(models.Model):
    """Keeps its attachment, and so the attachment's job, from being deleted."""

    attachment = models.ForeignKey(Attachment, on_delete=models.PROTECT, related_name="+")


class AnyJob(Job):
    """A proxy of the base model, as a project adds for a manager or an admin of its own."""

    class Meta:
        proxy = True


class ScriptedJobProxy(ScriptedJob):
    """A proxy of a job type's model."""

    class Meta:
        proxy = True
