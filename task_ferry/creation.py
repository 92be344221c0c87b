"""How a job comes to be: the values given for it checked and turned into a saved job of its
type's model, within the type's ``max_count``. ``JobHandler.create_and_start()`` and
``create_and_start_many()`` call this, then hand the jobs to the executor.

Every refusal is an ``InvalidJobValues`` (or ``MaxJobCountExceeded``) naming the field and
saying what to fix, raised before anything is written or with the transaction rolled back:
the database's own errors name no field, and some values it would store without a word.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, transaction
from django.db.models import NOT_PROVIDED, Field, IntegerField, JSONField, Model
from django.forms import Field as FormField

from task_ferry import statements
from task_ferry.exceptions import InvalidJobValues, MaxJobCountExceeded
from task_ferry.models import Job, jobs_database
from task_ferry.registry import JobType
from task_ferry.snapshot import storable
from task_ferry.transactions import lock_for_writing

__all__ = ["build", "check_max_count", "clash_within", "refused", "save", "save_many"]

# Django's own message for a value not given (a form's, DRF's): the API's serializer says it too.
REQUIRED = FormField.default_error_messages["required"]


def build(user: Any, job_type: JobType, values: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    """A new, validated, unsaved job of ``job_type`` from ``values``, and the values its
    ``prepare_values`` returned."""
    if user is not None and not getattr(user, "is_authenticated", False):
        raise InvalidJobValues("Jobs need a saved, authenticated user, or user=None.")
    if user is not None and unsaved(user):
        raise InvalidJobValues("Save the user before creating jobs for it.")
    model: type[Job] = job_type.model_class
    # prepare_values may take values that are no field (an upload it turns into a path), so
    # names are checked in what it returns. Its own error cannot tell a misspelt name.
    try:
        prepared = job_type.prepare_values(dict(values), user)
    except ValidationError as exc:
        message = _misspelt(job_type, _validation_message(exc), values)
        raise InvalidJobValues(message, _validation_errors(exc)) from exc
    except KeyError as exc:
        raise InvalidJobValues(
            _misspelt(job_type, _key_error_message(job_type, exc, values), values)
        ) from exc
    except (ValueError, TypeError) as exc:
        raise InvalidJobValues(_misspelt(job_type, str(exc) or type(exc).__name__, values)) from exc
    if not isinstance(prepared, dict):
        raise InvalidJobValues(
            f"{type(job_type).__name__}.prepare_values must return a dict, "
            f"got {type(prepared).__name__}."
        )
    many_to_many = _own_many_to_many(model)
    # Only the type's own columns: the base ones belong to the handler, and the link to the
    # Job row (``job_ptr_id``) would let the values choose the job's id.
    accepted = _accepted_names(model)
    unknown = [k for k in prepared if k not in accepted]
    if unknown:
        raise _unknown_fields(job_type, unknown, values)
    unlinkable = ValidationError(
        _unlinkable_values(model, prepared) | _cut_down_numbers(model, prepared)
    )
    if unlinkable.error_dict:
        raise InvalidJobValues(_validation_message(unlinkable), _validation_errors(unlinkable))
    columns = {k: v for k, v in prepared.items() if k not in many_to_many}
    job = model(
        user=user,
        type=job_type.type,
        content_type=ContentType.objects.get_for_model(model),
        **columns,
    )
    try:
        job.full_clean(exclude=[f.name for f in Job._meta.concrete_fields], validate_unique=False)
    except ValidationError as exc:
        errors = _validation_errors(exc)
        raise _model_refusal(model, errors, given=values.keys() | prepared.keys()) from exc
    except ArithmeticError as exc:
        # What Django's fields let escape: IntegerField's int(float("inf")) (OverflowError),
        # BooleanField's comparison of a signalling NaN Decimal (decimal.InvalidOperation).
        refusal = _arithmetic_error(job, columns)
        if refusal is None:
            raise  # The model's clean() or a constraint: a bug to fix, not the caller's values.
        raise refusal from exc
    except RecursionError as exc:
        nested = _nested_too_deeply(model, columns)
        if nested is None:
            raise  # Not from the values: the model's own clean(), say.
        raise nested from exc
    unstorable = _unstorable_values(job)
    if unstorable:
        raise _model_refusal(model, unstorable, given=values.keys() | prepared.keys())
    return job, prepared


def _model_refusal(
    model: type[Job], errors: dict[str, list[str]], *, given: Collection[Any]
) -> InvalidJobValues:
    """``InvalidJobValues`` for the model's refusal of the job's values. A field that has no
    default and was ``given`` no value at all (under its name or attname, by the caller or
    ``prepare_values``) is said to be required: its "cannot be null" or "cannot be blank" would
    have the caller look for an empty value it never sent."""
    own = {field.name: field for field in model.own_fields()}
    for name, messages in errors.items():
        field = own.get(name)
        if field is None or field.has_default() or field.db_default is not NOT_PROVIDED:
            continue
        if field.name in given or field.attname in given:
            continue
        empty = {str(field.error_messages["null"]), str(field.error_messages["blank"])}
        errors[name] = [str(REQUIRED) if message in empty else message for message in messages]
    return InvalidJobValues(_errors_message(errors), errors)


def _arithmetic_error(job: Job, columns: dict[str, Any]) -> InvalidJobValues | None:
    """``InvalidJobValues`` naming the value whose field's cleaning raises an
    ``ArithmeticError``; None when no field's does."""
    for name, value in columns.items():
        field = job._meta.get_field(name)
        if not isinstance(field, Field):
            continue
        try:
            field.clean(value, job)
        except ArithmeticError as exc:
            message = f"{value!r} is not a value this field takes ({type(exc).__name__})."
            return InvalidJobValues(f"Invalid job values: {name}: {message}", {name: [message]})
        except Exception:
            continue
    return None


def _nested_too_deeply(model: type[Job], columns: dict[str, Any]) -> InvalidJobValues | None:
    """``InvalidJobValues`` naming the ``JSONField`` values nested too deeply for ``json`` (a
    ``RecursionError`` out of its validation); None when none is."""
    message = "Nested too deeply to be stored as JSON."
    errors: dict[str, list[str]] = {}
    for field in model.own_fields():
        if isinstance(field, JSONField) and field.name in columns:
            try:
                json.dumps(columns[field.name], cls=field.encoder)
            except RecursionError:
                errors[field.name] = [message]
            except (TypeError, ValueError):
                continue
    return InvalidJobValues(_errors_message(errors), errors) if errors else None


def save(user: Any, job_type: JobType, job: Job, prepared: dict[str, Any]) -> None:
    max_count = job_type.get_max_count() if user is not None else None
    links = _links(job, prepared)
    if (
        max_count is None
        and not links
        and type(job_type).after_job_creation is JobType.after_job_creation
    ):
        # Nothing else to do in the transaction: both rows in one statement, if we can.
        with _values_refused():
            if statements.insert_job(job):
                return
    with transaction.atomic(using=jobs_database()):
        check_max_count(user, job_type, max_count, adding=1)
        with _values_refused():
            job.save(force_insert=True)
        _set_links(job, links)
        _after_job_creation(job_type, job, prepared)


def save_many(user: Any, job_type: JobType, built: list[tuple[Job, dict[str, Any]]]) -> None:
    """Save the jobs of ``create_and_start_many``, inside its transaction."""
    max_count = job_type.get_max_count() if user is not None else None
    check_max_count(user, job_type, max_count, adding=len(built))
    jobs = [job for job, _prepared in built]
    with _values_refused():
        if not statements.insert_jobs(jobs):
            for job in jobs:
                job.save(force_insert=True)
    for position, (job, prepared) in enumerate(built):
        try:
            _set_links(job, _links(job, prepared))
            _after_job_creation(job_type, job, prepared)
        except InvalidJobValues as exc:
            raise InvalidJobValues(f"Job {position}: {exc}", exc.errors) from exc


def check_max_count(user: Any, job_type: JobType, max_count: int | None, *, adding: int) -> None:
    """Raise ``MaxJobCountExceeded`` unless ``adding`` more live jobs of the type keep the
    user within ``max_count``. Locks the user's row until the transaction ends, so
    concurrent creates cannot both squeeze in."""
    if max_count is None:
        return
    lock_for_writing(jobs_database())
    if not _lock_user(user):
        raise _user_gone(user)
    # Counted where the lock is held: a replica would miss the jobs of this transaction.
    jobs = Job.objects.using(jobs_database())
    live = jobs.live().filter(user_id=user.pk, type=job_type.type).count()
    if live + adding > max_count:
        raise MaxJobCountExceeded(job_type.type, max_count)


def refused(user: Any, exc: IntegrityError) -> InvalidJobValues:
    """The clear error for a job the database refused to store."""
    connection = transaction.get_connection(jobs_database())
    # Inside a caller's broken transaction nothing more can be asked.
    if user is not None and not connection.needs_rollback:
        users = user._meta.model._default_manager
        if not users.filter(pk=user.pk).exists():
            return _user_gone(user)
    return InvalidJobValues(f"The database refused this job's values: {exc}")


def _lock_user(user: Any) -> bool:
    """Serialise job creation per user, so concurrent creates respect ``max_count``.
    False if the user's row is gone."""
    # _meta, not type(): request.user is a SimpleLazyObject under session auth. Through
    # the connection that inserts the job: its foreign key puts users in the same database.
    locked = (
        user._meta.model._default_manager.using(jobs_database())
        .select_for_update()
        .filter(pk=user.pk)
        .values_list("pk", flat=True)
        .first()
    )
    return locked is not None


def _after_job_creation(job_type: JobType, job: Job, prepared: dict[str, Any]) -> None:
    """The type's ``after_job_creation``. A ``ValidationError`` from it (checked against the
    saved row, say) refuses the values as one from ``prepare_values`` does; the row is rolled
    back with the creation's transaction."""
    try:
        job_type.after_job_creation(job, prepared)
    except ValidationError as exc:
        raise InvalidJobValues(_validation_message(exc), _validation_errors(exc)) from exc


@functools.cache
def _own_many_to_many(model: type[Job]) -> frozenset[str]:
    """The names of the many-to-many fields a job type's model adds to ``Job``."""
    return frozenset(f.name for f in model._meta.many_to_many if f.model is not Job)


@functools.cache
def _accepted_names(model: type[Job]) -> frozenset[str]:
    """The names a job type's model takes values under: its own fields (a foreign key by its
    name and its attname) and its many-to-many fields."""
    own = {name for f in model.own_fields() for name in (f.name, f.attname)}
    return frozenset(own | _own_many_to_many(model))


def _field_names(model: type[Job]) -> list[str]:
    """The type's own fields as a caller would list them: in declaration order, foreign keys
    by name, many-to-many fields last."""
    return [f.name for f in model.own_fields()] + sorted(_own_many_to_many(model))


# How alike a name must be to a field's to be offered as its spelling (difflib's ratio). A
# misspelling surely unknown gets the looser one; a name prepare_values may have taken on
# purpose, the stricter.
CLOSE_TO_UNKNOWN = 0.6
CLOSE_TO_TAKEN = 0.75


def _closest_field(
    model: type[Job], name: str, cutoff: float, given: Collection[Any] = ()
) -> str | None:
    """The own field whose name ``name`` most likely misspells, among those not ``given``."""
    candidates = [field for field in _field_names(model) if field not in given]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _unknown_fields(
    job_type: JobType, unknown: list[Any], values: Mapping[Any, Any]
) -> InvalidJobValues:
    """The error for names that are no field of the type's model: each named, with the field
    it most likely misspells among those not in ``values`` (as given, before
    ``prepare_values``), and the fields there are."""
    model: type[Job] = job_type.model_class
    base_fields = {f.name for f in Job._meta.concrete_fields} | {"id", "pk"}
    described: list[str] = []
    errors: dict[str, list[str]] = {}
    for name in unknown:
        if isinstance(name, str) and name in base_fields:
            described.append(f"{name!r} (a field of every job, which task_ferry sets)")
            errors[name] = ["Unknown field."]
            continue
        closest = (
            _closest_field(model, name, CLOSE_TO_UNKNOWN, given=values.keys())
            if isinstance(name, str)
            else None
        )
        if closest is None:
            described.append(repr(name))
            errors[str(name)] = ["Unknown field."]
        else:
            described.append(f"{name!r} (did you mean {closest!r}?)")
            errors[name] = [f"Unknown field. Did you mean {closest!r}?"]
    fields = ", ".join(_field_names(model)) or "none of their own"
    return InvalidJobValues(
        f"{job_type.type!r} jobs have no field(s) {', '.join(described)}. Their fields: {fields}.",
        errors,
    )


def _misspelt(job_type: JobType, message: str, values: Mapping[Any, Any]) -> str:
    """``message``, an error of ``prepare_values``, followed by the names given that are no
    field of the type's model and look like one that was not given: the type's own message
    ("table_id is required") cannot point out a misspelling. Other names, which it may take on
    purpose, are left out."""
    model: type[Job] = job_type.model_class
    accepted = _accepted_names(model)
    hints = []
    for name in values:
        if not isinstance(name, str) or name in accepted:
            continue
        closest = _closest_field(model, name, CLOSE_TO_TAKEN, given=values.keys())
        if closest is not None:
            hints.append(
                f"{name!r} is not a field of {job_type.type!r} jobs: did you mean {closest!r}?"
            )
    return f"{message.rstrip('.')}. {' '.join(hints)}" if hints else message


def _key_error_message(job_type: JobType, exc: KeyError, values: Mapping[Any, Any]) -> str:
    """The message for a ``KeyError`` from ``prepare_values``, whose own text is the bare key
    (``'table_id'``): most likely a value it needs that was not given."""
    hook = f"{type(job_type).__name__}.prepare_values"
    key = exc.args[0] if len(exc.args) == 1 else None
    if isinstance(key, str) and key not in values:
        return f"No value for {key!r} was given ({hook} raised KeyError)."
    return f"{hook} raised KeyError: {exc}."


def _links(job: Job, prepared: dict[str, Any]) -> dict[str, Any]:
    """The values given to the job's many-to-many fields: rows to link once it is saved."""
    many_to_many = _own_many_to_many(type(job))
    if not many_to_many:
        return {}
    return {name: value for name, value in prepared.items() if name in many_to_many}


def _set_links(job: Job, links: dict[str, Any]) -> None:
    """Link the saved job to the rows (or keys) given for its many-to-many fields, as
    ``ModelForm.save()`` does after saving the row. Keys no row has are refused first, on every
    database: MySQL and MariaDB would drop their links without a word (Django inserts them with
    ``INSERT IGNORE``) or, through a model of the project's, refuse them naming no field, as the
    others do at the commit."""
    for name, value in links.items():
        try:
            if isinstance(value, str | bytes | Mapping):
                # Iterated, "12" would link the rows with keys 1 and 2.
                raise TypeError(
                    f"Must be a list of rows or keys, got {type(value).__name__} {value!r}."
                )
            items = list(value)
            missing = _missing_rows(job, name, items)
            if not missing:
                getattr(job, name).set(items)
        except (TypeError, ValueError) as exc:
            # Not a list of rows or keys, rows of another model, unsaved rows.
            raise InvalidJobValues(
                f"Invalid job values. {name}: {exc}", {name: [str(exc)]}
            ) from exc
        if missing:
            raise InvalidJobValues(f"Invalid job values. {name}: {missing[0]}", {name: missing})


def _missing_rows(job: Job, name: str, items: list[Any]) -> list[str]:
    """Messages for the keys among ``items`` that no row of the many-to-many field ``name``'s
    model has; one query, none for an empty list. Objects that are not saved rows of that model
    are left to ``set()`` to refuse."""
    field = next(f for f in type(job)._meta.many_to_many if f.name == name)
    target = field.target_field
    related = target.model
    wanted = set()
    for item in items:
        if not isinstance(item, Model):
            wanted.add(target.get_prep_value(item))
        elif isinstance(item, related) and getattr(item, target.attname) is not None:
            wanted.add(getattr(item, target.attname))
    if not wanted:
        return []
    found = set(
        related._base_manager.using(job._state.db)
        .filter(**{f"{target.attname}__in": wanted})
        .values_list(target.attname, flat=True)
    )
    return [
        f"No {related.__name__} has {target.name} {key!r}."
        for key in sorted(wanted - found, key=repr)
    ]


def _unlinkable_values(model: type[Job], prepared: dict[str, Any]) -> dict[str, list[str]]:
    """Messages, by field, for the objects given to the type's own foreign keys that cannot be
    linked to: an instance of another model (Django's own error would name no field) or an
    unsaved one (a nullable key would be stored empty on PostgreSQL; Django's save() refuses
    it elsewhere, naming no field)."""
    errors: dict[str, list[str]] = {}
    for field in model.own_fields():
        value = prepared.get(field.name)
        if not field.is_relation or value is None or field.name == field.attname:
            continue
        related = field.related_model
        if not isinstance(related, type):
            continue  # Not resolved to a model: Django's own error then.
        # As Django's descriptor checks: a key to a proxy takes its concrete model's rows.
        if not isinstance(value, related._meta.concrete_model or related):
            errors[field.name] = [
                f"Must be a {related.__name__} instance (or its key as {field.attname}), got "
                f"{type(value).__name__} {value!r}."
            ]
        elif value.pk is None:
            errors[field.name] = [
                f"This {related.__name__} is not saved yet: save it before creating the job."
            ]
    return errors


def _cut_down_numbers(model: type[Job], prepared: dict[str, Any]) -> dict[str, list[str]]:
    """Messages, by field, for numbers that Django's ``int()`` would cut down without a word:
    a fraction given to an integer field (2.9 stored as 2), or as an integer key of a foreign
    key or many-to-many field (1.5 linked to row 1), and booleans given as such numbers."""
    errors: dict[str, list[str]] = {}
    integers = _integer_names(model)
    for name, value in prepared.items():
        field_name = integers.get(name)
        if field_name is None:
            continue
        many = name in _own_many_to_many(model) and isinstance(value, list | tuple | set)
        for item in value if many else [value]:
            problem = _not_an_integer(item)
            if problem:
                errors.setdefault(field_name, []).append(problem)
    return errors


@functools.cache
def _integer_names(model: type[Job]) -> dict[str, str]:
    """The names a job's values give integers by, each with its field's name: the type's own
    integer fields, and the keys of its relations to rows with integer keys (``marker_id``,
    or a many-to-many field's name; a foreign key's own name takes an object)."""
    many_to_many = [f for f in model._meta.many_to_many if f.name in _own_many_to_many(model)]
    names: dict[str, str] = {}
    for field in [*model.own_fields(), *many_to_many]:
        # A key's column takes what the field it points to takes.
        if isinstance(getattr(field, "target_field", field), IntegerField):
            names[field.name if field.many_to_many else field.attname] = field.name
    return names


def _not_an_integer(value: Any) -> str:
    """Why ``value``, given for an integer, would not be stored as given; empty if it would."""
    if isinstance(value, bool):
        return f"Must be a whole number, got {value!r}, which would be stored as {int(value)}."
    if isinstance(value, float):
        finite = math.isfinite(value)
        whole = finite and value.is_integer()
    elif isinstance(value, Decimal):
        finite = value.is_finite()
        whole = finite and value == value.to_integral_value()
    else:
        return ""
    if whole:
        return ""
    if not finite:
        return f"Must be a whole number, got {value!r}."
    return f"Must be a whole number, got {value!r}. Round it first if that is what you mean."


def _unstorable_values(job: Job) -> dict[str, list[str]]:
    """Messages, by field, for the job's own values that ``full_clean()`` lets through and the
    database would refuse at the insert, with an error naming no field (nor, in a batch, the
    job): None in a NOT NULL column (``full_clean()`` skips "empty" values of a blank field),
    a value the field cannot convert ([] for a nullable number), text with a NUL character
    (PostgreSQL refuses it) or a lone surrogate (no driver encodes it), a NaN or an infinity in
    a ``JSONField`` or a ``FloatField`` (stored by PostgreSQL, refused by the other databases,
    and never shown by the API: JSON has no such numbers)."""
    errors: dict[str, list[str]] = {}
    for field in type(job).own_fields():
        # The database computes it, and reading it from an unsaved job raises.
        if getattr(field, "generated", False):
            continue
        value = getattr(job, field.attname)
        if hasattr(value, "resolve_expression"):
            continue  # The database computes it: a db_default, an F() expression.
        if value is None:
            filled_at_save = getattr(field, "auto_now", False) or getattr(
                field, "auto_now_add", False
            )
            if not field.null and not filled_at_save:
                errors[field.name] = [str(field.error_messages["null"])]
            continue
        try:
            prepared = field.get_prep_value(value)
        except (TypeError, ValueError, ValidationError) as exc:
            errors[field.name] = [str(exc)]
            continue
        if isinstance(prepared, str) and storable(prepared) != prepared:
            errors[field.name] = [
                "This text has a NUL character or a lone surrogate (from an undecodable file "
                "name, say), which cannot be stored."
            ]
        elif isinstance(field, JSONField) and not json_compliant(prepared, field):
            errors[field.name] = [
                "NaN and infinite numbers cannot be stored as JSON: use None or a string."
            ]
        elif isinstance(prepared, float) and not math.isfinite(prepared):
            # PostgreSQL stores them; JSON, and so the API, cannot show them.
            errors[field.name] = [f"Must be a finite number, got {prepared!r}."]
    return errors


def json_compliant(value: Any, field: JSONField) -> bool:
    """Whether ``value`` holds no NaN or infinity, which Python's json writes and every
    database's JSON refuses. Only numbers are looked at: ``full_clean()`` has checked that the
    field's encoder takes the value."""
    try:
        json.dumps(value, cls=field.encoder, allow_nan=False)
    except ValueError:
        return False
    except TypeError:
        return True  # Not JSON at all: the database's to refuse, as before.
    return True


@functools.cache
def _unique_field_sets(model: type[Job]) -> tuple[tuple[tuple[str, ...], bool], ...]:
    """The sets of the type's own fields whose values the database keeps unique in every row
    (``unique=True``, ``unique_together``, a ``UniqueConstraint`` on fields without a
    condition), each with whether NULLs count as equal (``nulls_distinct=False``)."""
    own = {f.name for f in model.own_fields()}
    sets: list[tuple[tuple[str, ...], bool]] = [
        ((f.name,), False) for f in model.own_fields() if f.unique
    ]
    for cls in [model, *model._meta.get_parent_list()]:
        meta = cls._meta
        sets += [(tuple(names), False) for names in meta.unique_together]
        sets += [
            (tuple(c.fields), getattr(c, "nulls_distinct", None) is False)
            for c in meta.total_unique_constraints
        ]
    return tuple(dict.fromkeys(entry for entry in sets if set(entry[0]) <= own))


def clash_within(jobs: Sequence[Job]) -> InvalidJobValues | None:
    """The error naming the jobs of one batch that have the same values for fields the
    database keeps unique, which its refusal would not name; None if none do. No query: a
    clash with a row already stored is still the database's to refuse."""
    model = type(jobs[0])
    unique_sets = _unique_field_sets(model)
    if not unique_sets:
        return None
    own = {field.name: field for field in model.own_fields()}
    for names, nulls_equal in unique_sets:
        fields = [own[name] for name in names]
        seen: dict[Any, list[int]] = {}
        for position, job in enumerate(jobs):
            values = tuple(getattr(job, field.attname) for field in fields)
            if any(hasattr(v, "resolve_expression") for v in values):
                continue  # The database computes it (a db_default).
            if not nulls_equal and any(v is None for v in values):
                continue  # NULLs differ from each other.
            try:
                seen.setdefault(values, []).append(position)
            except TypeError:
                break  # Unhashable (a JSONField's dict): left to the database.
        clashing = next((positions for positions in seen.values() if len(positions) > 1), None)
        if clashing is None:
            continue
        listed = ", ".join(str(p) for p in clashing[:-1]) + f" and {clashing[-1]}"
        labels = " and ".join(str(field.verbose_name) for field in fields)
        together = " together" if len(fields) > 1 else ""
        message = f"Jobs {listed} have the same {labels}, which must be unique{together}."
        key = names[0] if len(names) == 1 else "non_field_errors"
        return InvalidJobValues(message, {key: [message]})
    return None


@contextlib.contextmanager
def _values_refused() -> Iterator[None]:
    """Values ``full_clean()`` lets through as "empty" ([] for a nullable number, say) and the
    database driver refuses become ``InvalidJobValues``."""
    try:
        yield
    except (TypeError, ValueError, DataError) as exc:
        raise InvalidJobValues(f"Invalid job values: {exc}") from exc


def unsaved(user: Any) -> bool:
    """Whether ``user`` was never saved. A key the model fills in itself (a ``UUIDField`` with
    ``default=uuid4``) is set before the save: such a user is unsaved if no row has its key.
    A user built with the key of a saved one (``User(pk=...)``, to spare a query) is saved."""
    if user.pk is None:
        return True
    if not user._state.adding:
        return False
    return not user._meta.model._base_manager.using(jobs_database()).filter(pk=user.pk).exists()


def _user_gone(user: Any) -> InvalidJobValues:
    return InvalidJobValues(f"User {user.pk} does not exist (any more).")


def _validation_errors(exc: ValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        return {
            field: [str(m) for e in errs for m in e.messages]
            for field, errs in exc.error_dict.items()
        }
    return {"non_field_errors": [str(m) for m in exc.messages]}


def _validation_message(exc: ValidationError) -> str:
    return _errors_message(_validation_errors(exc))


def _errors_message(errors: dict[str, list[str]]) -> str:
    parts = [f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()]
    return "Invalid job values. " + "; ".join(parts)
