"""Error-to-status mapping and the retry policy."""

from __future__ import annotations

import grpc
import pytest

from splitfed.errors import (
    DataLossError,
    InvalidArgumentError,
    LimitExceededError,
    PermissionDeniedError,
    error_from_rpc,
    status_for,
)
from splitfed.retry import RetryPolicy, call_with_retry, is_retryable


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (LimitExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DataLossError("x"), grpc.StatusCode.DATA_LOSS),
        (PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_known_errors_keep_their_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc) == (code, "x")


def test_unknown_errors_hide_internals() -> None:
    code, message = status_for(KeyError("/secret/path"))
    assert code is grpc.StatusCode.INTERNAL
    assert "secret" not in message


def test_plain_value_error_is_not_blamed_on_the_caller() -> None:
    assert status_for(ValueError("bug"))[0] is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL),
    ],
)
def test_a_service_this_one_depends_on_being_down_is_unavailable_not_internal(
    code: grpc.StatusCode, expected: grpc.StatusCode
) -> None:
    """A failed call to another service (the backbone fetching a key from a restarting key
    manager) is retryable for the caller only if that service was down or slow; its
    details (addresses) are not passed on."""
    got, message = status_for(FakeRpcError(code, "ipv4:10.0.0.7:7443: Connection refused"))
    assert got is expected
    assert "10.0.0.7" not in message


def test_error_from_rpc_maps_back() -> None:
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.DATA_LOSS, "checksum mismatch"))
    assert isinstance(err, DataLossError) and str(err) == "checksum mismatch"
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE)) is None


def test_delays_grow_exponentially_are_capped_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=1, max_backoff_s=5, jitter=0.5)
    assert list(policy.delays(rng=lambda: 0.0)) == [1, 2, 4, 5, 5]
    assert list(policy.delays(rng=lambda: 1.0)) == [0.5, 1, 2, 2.5, 2.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"initial_backoff_s": 2, "max_backoff_s": 1}, "initial_backoff_s"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 2}, "jitter"),
    ],
)
def test_policy_validates(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def run(errors: list[Exception], policy: RetryPolicy) -> tuple[str | Exception, list[float]]:
    slept: list[float] = []
    calls = iter(errors)

    def call() -> str:
        err = next(calls, None)
        if err is not None:
            raise err
        return "ok"

    try:
        return call_with_retry(call, policy, sleep=slept.append, rng=lambda: 0.0), slept
    except grpc.RpcError as err:
        return err, slept


def test_unavailable_and_deadline_are_retried_until_success() -> None:
    errors: list[Exception] = [
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"),
        FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
    ]
    result, slept = run(errors, RetryPolicy(initial_backoff_s=0.1))
    assert result == "ok"
    assert slept == pytest.approx([0.1, 0.2])


def test_gives_up_after_max_attempts() -> None:
    errors: list[Exception] = [FakeRpcError(grpc.StatusCode.UNAVAILABLE)] * 5
    result, slept = run(errors, RetryPolicy(max_attempts=3))
    assert isinstance(result, FakeRpcError)
    assert len(slept) == 2


@pytest.mark.parametrize(
    "err",
    [
        FakeRpcError(grpc.StatusCode.UNAUTHENTICATED),
        FakeRpcError(grpc.StatusCode.PERMISSION_DENIED),
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT),
        FakeRpcError(
            grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"
        ),
        FakeRpcError(
            grpc.StatusCode.UNAVAILABLE,
            "Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification",
        ),
    ],
)
def test_authentication_and_caller_errors_are_never_retried(err: FakeRpcError) -> None:
    assert not is_retryable(err)
    result, slept = run([err], RetryPolicy())
    assert result is err and slept == []
