"""Every error carries its cause and whether it is transient; the tasks' retry condition and the
flow's failure cause read those attributes, never class names."""

from __future__ import annotations

import pytest

from fedcore import errors
from fedcore.errors import FedError, cause_of

# class -> (cause, transient): the policy in one table.
TABLE = {
    errors.FedError: ("failed", False),
    errors.ConfigError: ("failed", False),
    errors.DataError: ("failed", False),
    errors.ShardError: ("failed", False),
    errors.WireError: ("failed", False),
    errors.FrameTooLarge: ("failed", False),
    errors.UpdateRejected: ("rejected", False),
    errors.WorkerError: ("failed", False),
    errors.WorkerUnreachable: ("unreachable", True),
    errors.WorkerTimeout: ("timeout", False),  # the round's deadline has passed
    errors.WorkerFailed: ("failed", False),
    errors.HostKeyMismatch: ("failed", False),
    errors.QuorumNotReached: ("failed", True),  # the flow may train the round again
}
WORKER_ERRORS = (errors.UpdateRejected, errors.WorkerError)


def _make(cls: type[FedError]) -> FedError:
    return cls("alice", "what went wrong") if issubclass(cls, WORKER_ERRORS) else cls("bad")


def test_the_table_covers_every_error_class() -> None:
    defined = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, FedError)}
    assert defined == set(TABLE)


@pytest.mark.parametrize(("cls", "expected"), list(TABLE.items()), ids=lambda v: str(v))
def test_each_error_sets_its_cause_and_transience(
    cls: type[FedError], expected: tuple[str, bool]
) -> None:
    assert "cause" in vars(cls) and "transient" in vars(cls)  # set on the class, not inherited
    exc = _make(cls)
    assert (exc.cause, exc.transient) == expected
    assert cause_of(exc) == expected[0]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), TimeoutError(), None, "not an error"])
def test_anything_else_is_a_plain_failure(exc: object) -> None:
    assert cause_of(exc) == "failed"


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda v: v.__name__)
def test_the_retry_condition_follows_the_table(cls: type[FedError]) -> None:
    from prefect.states import Failed

    from tasks.workers import is_transient, train_answering

    # Prefect's task engine hands retry_condition_fn the failure as Failed(data=exception).
    assert is_transient(train_answering, None, Failed(data=_make(cls))) is TABLE[cls][1]


def test_other_exceptions_are_never_retried() -> None:
    from prefect.states import Failed

    from tasks.workers import is_transient, train_answering

    for exc in (RuntimeError("boom"), TimeoutError("late"), ConnectionError("gone")):
        assert is_transient(train_answering, None, Failed(data=exc)) is False


def test_every_worker_task_retries_on_that_condition() -> None:
    from tasks.workers import evaluate_models, is_transient, start_worker, train_answering

    for t in (start_worker, train_answering, evaluate_models):
        assert t.retry_condition_fn is is_transient and t.retries >= 1
