"""The job models in a project that forgot to install task_ferry."""

import pytest

from tests.projects import manage_py_check


def run_check(tmp_path, root_urlconf):
    """``manage.py check`` of a project whose INSTALLED_APPS has the test app, which defines
    job models, and rest_framework, but not task_ferry."""
    project_settings = {
        "SECRET_KEY": "tests-only",
        "USE_TZ": True,
        "INSTALLED_APPS": [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "rest_framework",
            *(["tests.testapp"] if root_urlconf is None else []),
        ],
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path / "db.sqlite3"),
            }
        },
        "ROOT_URLCONF": root_urlconf or "without_ferry_urls",
    }
    (tmp_path / "without_ferry_urls.py").write_text("urlpatterns = []\n")
    (tmp_path / "api_urls.py").write_text(
        "from django.urls import include, path\n\n"
        'urlpatterns = [path("api/jobs/", include("task_ferry.api.urls"))]\n'
    )
    return manage_py_check(tmp_path, project_settings)


@pytest.mark.parametrize(
    "root_urlconf",
    [
        pytest.param(None, id="a job model"),
        pytest.param("api_urls", id="the API's URLconf"),
    ],
)
def test_importing_the_models_without_the_app_says_to_install_it(tmp_path, root_urlconf):
    returncode, output = run_check(tmp_path, root_urlconf)
    assert returncode != 0
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("task_ferry.exceptions.TaskFerryImproperlyConfigured: ")
    assert 'Add "task_ferry" to INSTALLED_APPS' in last_line
    # Django's own RuntimeError said the model "isn't in an application in INSTALLED_APPS".
    assert "RuntimeError" not in output
