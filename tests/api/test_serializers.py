"""The related-key fields of the type serializers, apart from the views."""

import datetime

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.exceptions import ValidationError

from task_ferry.api.serializers import RelatedKeyField, RelatedKeysField
from tests.testapp.models import Marker


def errors(field, data):
    with pytest.raises(ValidationError) as caught:
        field.run_validation(data)
    return [str(message) for message in caught.value.detail]


def test_a_text_key_is_read_one_by_one_and_refuses_what_no_text_key_is(db):
    # Session's key is text: the rows are read as DRF reads them, one per key, since the
    # database's collation may match a key the list does not spell the same way.
    expires = timezone.now() + datetime.timedelta(days=1)
    first, second = (Session.objects.create(session_key=k, expire_date=expires) for k in "ab")
    field = RelatedKeyField(many=True, queryset=Session.objects.all())
    assert isinstance(field, RelatedKeysField)
    assert field.run_validation(["a", "b"]) == [first, second]
    assert errors(field, ["a", 1.5]) == [
        "Incorrect type. Expected a key of the related rows, received float 1.5."
    ]
    assert errors(field, [None]) == ["The list may not contain null: send only keys of rows."]
    assert errors(field, ["c"]) == ['Invalid pk "c" - object does not exist.']


def test_a_list_of_integer_keys_is_read_in_one_query_keeping_its_order(db):
    markers = [Marker.objects.create(name=str(i)) for i in range(5)]
    field = RelatedKeyField(many=True, queryset=Marker.objects.all())
    keys = [m.pk for m in reversed(markers)]
    with CaptureQueriesContext(connection) as queries:
        assert field.run_validation([str(keys[0]), *keys[1:], keys[0]]) == [
            *reversed(markers),
            markers[-1],
        ]
    assert len(queries) == 1
    with CaptureQueriesContext(connection) as queries:
        assert field.run_validation([]) == []
    assert len(queries) == 0
    empty_refused = RelatedKeyField(many=True, allow_empty=False, queryset=Marker.objects.all())
    assert errors(empty_refused, []) == ["This list may not be empty."]
    assert errors(field, 3) == ['Expected a list of items but got type "int".']


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            "OperationalError: cannot connect to postgresql://app:s3cr%40t@db:5432/shop",
            "OperationalError: cannot connect to postgresql://app:***@db:5432/shop",
        ),
        (
            "ConnectionError: redis://:pw@cache:6379/0 refused",
            "ConnectionError: redis://:***@cache:6379/0 refused",
        ),
        ("Error: amqp://guest:guest@rabbit// down", "Error: amqp://guest:***@rabbit// down"),
        ("Error: redis://app@prod:pw@host/0 down", "Error: redis://app@prod:***@host/0 down"),
        ("Error: http://host:8080/x down", "Error: http://host:8080/x down"),
        ("Error: user@example.com failed", "Error: user@example.com failed"),
        (
            "OperationalError: dbname=shop user=app password=hunter2 host=db",
            "OperationalError: dbname=shop user=app password=*** host=db",
        ),
        (
            "HTTPError: 401 for url: /v1/x?token=abc&page=2",
            "HTTPError: 401 for url: …?token=***&page=2",
        ),
        (
            "ValueError: bad config {'user': 'app', 'password': 'hunter2', 'secret_key': \"k\"}",
            "ValueError: bad config {'user': 'app', 'password': ***, 'secret_key': ***}",
        ),
        ("HTTPError: Authorization: Bearer abc.def-ghi", "HTTPError: Authorization: Bearer ***"),
        ("InvalidTokenError: Signature has expired", "InvalidTokenError: Signature has expired"),
        ("KeyError: 'password'", "KeyError: 'password'"),
        (
            "Error: url=redis://h:6379?password=pw down",
            "Error: url=redis://h:6379?password=*** down",
        ),
        ("TypeError: author=someone is fine", "TypeError: author=someone is fine"),
    ],
)
def test_clean_error_hides_credentials_an_exception_quotes(error, shown):
    from task_ferry.api.serializers import clean_error

    assert clean_error(error) == shown
