import math
import sys
from decimal import Decimal
from fractions import Fraction

import pytest
from django.utils.text import format_lazy
from django.utils.translation import gettext_lazy, override

from task_ferry import progress as progress_module
from task_ferry.exceptions import JobCancelled
from task_ferry.progress import FOLD_CHILDREN_AT, Progress


def test_root_counts_to_100():
    progress = Progress()
    progress.increment(10, state="Fetched rows")
    assert progress.percentage == 10
    assert progress.state == "Fetched rows"
    progress.increment(90)
    assert progress.percentage == 100
    assert progress.state == "Fetched rows"


def test_spec_example_weights_stages():
    progress = Progress()
    progress.increment(10, state="Fetched rows")
    write_stage = progress.create_child(represents=80, total=200)
    for row in range(100):
        write_stage.increment(state=f"Writing row {row}...")
    assert progress.percentage == 50
    assert progress.state == "Writing row 99..."
    for row in range(100, 200):
        write_stage.increment(state=f"Writing row {row}...")
    assert progress.percentage == 90
    progress.increment(10, state="Finalising")
    assert progress.percentage == 100


def test_unequal_weights_across_many_children():
    progress = Progress()
    small = [progress.create_child(represents=1, total=10) for _ in range(50)]
    big = progress.create_child(represents=50, total=4)
    for child in small:
        child.increment(10)
    assert progress.percentage == 50
    big.increment(2)
    assert progress.percentage == 75
    big.increment(2)
    assert progress.percentage == 100


def test_thousands_of_children_add_up_exactly():
    progress = Progress()
    stages = [progress.create_child(represents=0.01, total=3) for _ in range(10_000)]
    for stage in stages[:5000]:
        stage.increment(3)
    assert progress.percentage == 50
    # Children created after many completed ones still count (completed ones are folded).
    late = progress.create_child(represents=0, total=1)
    late.increment()
    for stage in stages[5000:]:
        stage.increment(3)
    assert progress.percentage == 100
    assert progress.fraction() == pytest.approx(1.0)


def test_completed_children_are_folded_without_changing_the_total():
    progress = Progress()
    for _ in range(FOLD_CHILDREN_AT * 8):
        child = progress.create_child(represents=0.5, total=2)
        child.increment(2)
    folded, counted = progress._children
    assert len(counted) < FOLD_CHILDREN_AT * 2
    assert folded + sum(c._represents for c in counted) == pytest.approx(FOLD_CHILDREN_AT * 4)
    assert progress.percentage == FOLD_CHILDREN_AT * 4


def test_empty_children_are_folded_like_completed_ones():
    # A child per file, most of them empty: the monitor must not walk them all at each publish.
    progress = Progress()
    for _ in range(FOLD_CHILDREN_AT * 8):
        progress.create_child(represents=0.25, total=0)
    folded, counted = progress._children
    assert len(counted) < FOLD_CHILDREN_AT * 2
    assert folded + sum(c._represents for c in counted) == pytest.approx(FOLD_CHILDREN_AT * 2)
    assert progress.percentage == FOLD_CHILDREN_AT * 2


@pytest.fixture
def unfolded(monkeypatch):
    """A root whose children are never folded: what a folded tree must add up to."""

    def build():
        with monkeypatch.context() as patched:
            patched.setattr(progress_module, "FOLD_CHILDREN_AT", 10**9)
            return Progress()

    return build


def test_an_empty_child_folded_away_counts_again_once_track_gives_it_a_total(unfolded):
    """Stages made empty up front and filled by ``track()`` later: every percentage on the way
    is the one the tree gives without folding, also where an empty grandchild made its folded
    parent complete."""
    trees = [Progress(), unfolded()]
    seen: list[list[int]] = [[], []]
    for root, percentages in zip(trees, seen, strict=True):
        # Complete, its own step and its empty child's: folded away with the stages below.
        nested = root.create_child(represents=20, total=2)
        nested.increment()
        late_file = nested.create_child(represents=1, total=0)
        stages = [root.create_child(represents=1.25, total=0) for _ in range(FOLD_CHILDREN_AT * 4)]
        percentages.append(root.percentage)
        for stage in stages:
            for _row in stage.track(range(4)):
                percentages.append(root.percentage)
        for _row in late_file.track(range(2)):
            percentages.append(root.percentage)
        percentages.append(root.percentage)
    assert seen[0] == seen[1]


def test_a_folded_child_given_more_to_do_by_assigning_its_total_counts_again(unfolded):
    """Stages folded away as complete, then given a larger ``total`` by the job: each
    percentage is the one the tree gives without folding, also where a grandchild's new total
    makes its folded parent incomplete."""
    trees = [Progress(), unfolded()]
    seen: list[list[int]] = [[], []]
    for root, percentages in zip(trees, seen, strict=True):
        finished = root.create_child(represents=30, total=10)
        finished.increment(10)
        empty = root.create_child(represents=10, total=0)
        nested = root.create_child(represents=20, total=1)
        nested_file = nested.create_child(represents=1, total=1)
        nested_file.increment()
        rest = [root.create_child(represents=1.25, total=1) for _ in range(FOLD_CHILDREN_AT * 4)]
        percentages.append(root.percentage)
        finished.total = 20
        percentages.append(root.percentage)
        empty.total = 4
        percentages.append(root.percentage)
        nested_file.total = 4
        percentages.append(root.percentage)
        for stage in [finished, empty, nested_file, *rest]:
            stage.increment(stage.total)
            percentages.append(root.percentage)
    assert seen[0] == seen[1]
    assert seen[0][:4] == [60, 45, 35, 20]
    assert seen[0][-1] == 100


@pytest.mark.parametrize("attribute", ["total", "done"])
@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "10", None, True])
def test_assigning_a_bad_total_or_done_is_refused_and_changes_nothing(attribute, value):
    progress = Progress()
    stage = progress.create_child(represents=50, total=4)
    stage.increment(2)
    with pytest.raises(ValueError, match=rf"^Progress.{attribute} must be a finite number >= 0"):
        setattr(stage, attribute, value)
    assert (stage.total, stage.done, progress.percentage) == (4, 2, 25)


@pytest.mark.parametrize("done", [10**400, Decimal("1e400")], ids=["int", "Decimal"])
def test_assigning_a_done_beyond_a_float_is_refused_naming_it(done):
    stage = Progress().create_child(represents=50, total=4)
    with pytest.raises(ValueError, match=r"^Progress.done must be at most 1.798e\+308"):
        stage.done = done
    assert stage.done == 0


def test_assigning_done_past_the_total_is_clamped_like_an_overshooting_tick():
    progress = Progress()
    stage = progress.create_child(represents=30, total=10)
    stage.done = 25
    assert (stage.done, progress.percentage) == (10, 30)
    stage.done = Decimal("2.5")
    assert (stage.done, progress.percentage) == (2.5, 7)


def test_a_folded_child_whose_done_is_lowered_counts_again(unfolded):
    """Stages folded away as complete, then set back by assigning ``done``: each percentage is
    the one the tree gives without folding, also where a grandchild set back makes its folded
    parent incomplete."""
    trees = [Progress(), unfolded()]
    seen: list[list[int]] = [[], []]
    for root, percentages in zip(trees, seen, strict=True):
        finished = root.create_child(represents=30, total=10)
        finished.increment(10)
        nested = root.create_child(represents=20, total=1)
        nested_file = nested.create_child(represents=1, total=4)
        nested_file.increment(4)
        rest = [root.create_child(represents=1.25, total=1) for _ in range(FOLD_CHILDREN_AT * 4)]
        percentages.append(root.percentage)
        finished.done = 5
        percentages.append(root.percentage)
        nested_file.done = 1
        percentages.append(root.percentage)
        finished.done = 0
        percentages.append(root.percentage)
        for stage in [finished, nested_file, *rest]:
            stage.increment(stage.total)
            percentages.append(root.percentage)
    assert seen[0] == seen[1]
    assert seen[0][:4] == [50, 35, 20, 5]
    assert seen[0][-1] == 100


def test_nested_children():
    progress = Progress()
    stage = progress.create_child(represents=60, total=3)
    files = [stage.create_child(represents=1, total=100) for _ in range(3)]
    files[0].increment(100)
    assert progress.percentage == 20
    files[1].increment(50, state="half of file 2")
    assert progress.percentage == 30
    assert stage.percentage == 50
    assert files[1].state == progress.state == "half of file 2"
    files[1].increment(50)
    files[2].increment(100)
    assert progress.percentage == 60


def test_children_nest_deeper_than_the_recursion_limit():
    # A recursive walk (a directory tree, a thread of replies) makes a child per level.
    progress = Progress()
    node = progress.create_child(represents=100, total=1)
    for _ in range(sys.getrecursionlimit() + 100):
        node = node.create_child(represents=1, total=1)
    assert progress.percentage == 0
    node.increment(0.5)
    assert progress.percentage == 50
    node.increment(0.5)
    assert progress.percentage == 100


def test_a_node_counts_its_own_steps_and_its_childrens():
    stage = Progress().create_child(represents=100, total=10)
    stage.increment(5)
    part = stage.create_child(represents=5, total=2)
    part.increment()
    assert stage.percentage == 75


def test_overshooting_is_clamped():
    progress = Progress()
    child = progress.create_child(represents=30, total=10)
    child.increment(25)
    assert child.done == 10
    assert progress.percentage == 30
    progress.increment(500)
    assert progress.percentage == 100


def test_empty_child_is_complete_at_once():
    progress = Progress()
    progress.create_child(represents=40, total=0)
    assert progress.percentage == 40


def test_track_sets_total_from_a_sized_iterable_and_ticks_after_each_item():
    progress = Progress()
    stage = progress.create_child(represents=50, total=1)
    seen = []
    for item in stage.track(["a", "b", "c", "d"], state="tracking"):
        seen.append((item, progress.percentage))
    assert seen == [("a", 0), ("b", 12), ("c", 25), ("d", 37)]
    assert progress.percentage == 50
    assert progress.state == "tracking"


def test_track_on_a_node_with_children_keeps_its_total_so_progress_never_goes_back():
    progress = Progress()
    progress.create_child(represents=20, total=1).increment(state="Fetched rows")
    assert progress.percentage == 20
    seen = [progress.percentage for _row in progress.track(range(50), state="Writing")]
    assert seen == sorted(seen) and seen[0] == 20
    assert progress.total == 100 and progress.percentage == 70


def test_track_keeps_the_total_for_an_unsized_iterable():
    stage = Progress().create_child(represents=100, total=10)
    assert list(stage.track(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert stage.percentage == 50


@pytest.mark.parametrize("cleared", [None, ""])
def test_set_state_none_clears_the_label(cleared):
    progress = Progress()
    progress.create_child(represents=50, total=2).increment(state="Writing row 1")
    progress.set_state(cleared)
    assert progress.state == ""
    assert progress.percentage == 25
    # increment() without a state keeps the label, as before.
    progress.set_state("Finalising")
    progress.increment(10)
    assert progress.state == "Finalising"


# A message of Django's own catalogue: the test project has no locale of its own.
REQUIRED = gettext_lazy("This field is required.")


@pytest.mark.parametrize(
    "label_with",
    [
        lambda progress, label: progress.increment(state=label),
        lambda progress, label: progress.set_state(label),
        lambda progress, label: list(progress.track(["row"], state=label)),
    ],
    ids=["increment", "set_state", "track"],
)
def test_a_lazy_translation_is_a_label_in_the_language_of_the_tick(label_with):
    progress = Progress()
    with override("de"):
        label_with(progress, REQUIRED)
    # A plain str, made at the tick: the monitor's thread, which reads it, has a language of
    # its own.
    assert type(progress.state) is str
    assert progress.state == "Dieses Feld ist zwingend erforderlich."
    with override("fr"):
        label_with(progress, REQUIRED)
    assert progress.state == "Ce champ est obligatoire."


def test_a_label_made_by_format_lazy_is_taken_too():
    progress = Progress()
    with override("fr"):
        progress.increment(state=format_lazy("{}: {}", "Row 7", REQUIRED))
    assert progress.state == "Row 7: Ce champ est obligatoire."


class Label(str):
    pass


def test_a_str_subclass_is_a_label_as_it_is():
    progress = Progress()
    label = Label("Exporting")
    progress.increment(state=label)
    assert progress.state is label


@pytest.mark.parametrize(
    "label, kind",
    [(b"Exporting", "builtins.bytes"), (7, "builtins.int"), (["a"], "builtins.list")],
)
def test_a_label_neither_a_str_nor_a_lazy_translation_is_refused_saying_what_it_is(label, kind):
    progress = Progress()
    progress.increment(5, state="before")
    with pytest.raises(ValueError) as info:
        progress.increment(state=label)
    assert str(info.value) == (
        f"state must be a str or a lazy translation, got {kind}; pass str() of it"
    )
    # Nothing changed.
    assert (progress.percentage, progress.state) == (5, "before")


def test_fractional_steps_reach_100():
    progress = Progress()
    child = progress.create_child(represents=100, total=1)
    for _ in range(3):
        child.increment(1 / 3)
    assert progress.percentage == 100


@pytest.mark.parametrize(
    "by", [-1, -0.5, "1", None, True, math.nan, math.inf, [1], complex(1, 0), Decimal("NaN")]
)
def test_increment_rejects_bad_amounts(by):
    progress = Progress()
    progress.increment(5, state="before")
    with pytest.raises(ValueError, match=r"increment\(by=...\) must be a finite number >= 0"):
        progress.increment(by, state="after")
    # Nothing changed.
    assert (progress.percentage, progress.state) == (5, "before")


@pytest.mark.parametrize("by", [0, 2, 2.5, Decimal("2.5"), Fraction(5, 2)])
def test_increment_accepts_real_numbers(by):
    progress = Progress()
    progress.increment(by)
    assert progress.percentage == int(float(by))


@pytest.mark.parametrize("represents, total", [(-1, 10), (10, -1), (math.nan, 10), (10, "10")])
def test_create_child_rejects_bad_numbers(represents, total):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        Progress().create_child(represents=represents, total=total)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: Progress().create_child(10**400, 1), r"create_child\(represents=...\)"),
        (lambda: Progress().create_child(1, Decimal("1e400")), r"create_child\(total=...\)"),
        (lambda: Progress(10**400), r"Progress\(total=...\)"),
        (lambda: Progress(Fraction(10**5000, 3)), r"Progress\(total=...\)"),
    ],
    ids=["int represents", "Decimal total", "int root total", "Fraction root total"],
)
def test_amounts_beyond_a_float_are_refused_at_the_call_with_what_to_do(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be at most 1.798e\+308") as raised:
        call()
    assert "Count in larger steps" in str(raised.value)


@pytest.mark.parametrize(
    "step", [10**400, Decimal("1e400"), Fraction(10**400, 3)], ids=["int", "Decimal", "Fraction"]
)
def test_a_step_beyond_a_float_is_clamped_like_any_overshoot(step):
    progress = Progress()
    stage = progress.create_child(represents=50, total=2.5)
    stage.increment(0.5)
    stage.increment(step)
    assert stage.done == 2.5
    assert progress.percentage == 50


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: Progress(-(10**5000)), r"Progress\(total=...\)"),
        (
            lambda: Progress().create_child(Fraction(-(10**5000), 3), 1),
            r"create_child\(represents=...\)",
        ),
        (lambda: Progress().increment(Fraction(-(10**5000), 7)), r"increment\(by=...\)"),
    ],
    ids=["int", "Fraction represents", "Fraction step"],
)
def test_a_negative_number_too_long_to_print_is_refused_naming_the_argument(call, name):
    # Python refuses str() of an int beyond 4,300 digits: the message must not need it.
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number >= 0, got a negative"):
        call()


def test_folded_children_worth_nearly_the_largest_float_still_add_up():
    progress = Progress(sys.float_info.max)
    for _ in range(FOLD_CHILDREN_AT * 2):
        progress.create_child(represents=10**308, total=1).increment()
    assert progress.percentage == 100


def test_a_cancel_request_raises_at_the_next_tick_anywhere_in_the_tree():
    progress = Progress()
    child = progress.create_child(represents=50, total=10).create_child(represents=5, total=5)
    child.increment()
    progress.request_cancel()
    assert child.cancel_requested
    with pytest.raises(JobCancelled):
        child.increment()
    with pytest.raises(JobCancelled):
        progress.set_state("still here?")
