"""Settings of the test project as other real projects have them: naive local datetimes
(``USE_TZ = False``) in a time zone far from UTC, and a user model of their own whose primary
key is a UUID not named ``id`` (tests/accounts). ``make test-compat`` runs tests/compat under
them; TASK_FERRY_TEST_USE_TZ=1 keeps aware datetimes in that time zone."""

import os

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS

USE_TZ = os.environ.get("TASK_FERRY_TEST_USE_TZ") == "1"
# Three hours behind UTC: a naive local time read as UTC (or the reverse) is three hours off.
TIME_ZONE = "America/Sao_Paulo"

INSTALLED_APPS = [*INSTALLED_APPS, "tests.accounts"]
AUTH_USER_MODEL = "accounts.Account"
