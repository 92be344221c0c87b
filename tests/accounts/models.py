"""A project's own user model, as tests/settings_compat.py swaps it in: a UUID primary key
under a name other than ``id``."""

import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models


class Account(AbstractUser):
    account_uuid = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
