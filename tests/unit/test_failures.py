"""The classification of failed calls (splitfed/failures.py) on the details strings gRPC
1.6x and BoringSSL really write (captured from calls to servers on 127.0.0.1), and the
one line each cause becomes. The same causes through the CLI against real servers:
tests/integration/test_connection_errors.py."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from splitfed.cli.status import round_text
from splitfed.errors import UnauthenticatedError
from splitfed.failures import (
    Cause,
    ConnectionFailedError,
    Endpoint,
    call_failure,
    classify,
    explain,
)
from splitfed.retry import is_retryable
from splitfed.v1 import aggregator_pb2

U, D = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
LAST = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:39405: "
REAL = [
    (
        U,
        LAST + "Custom verification check failed with error: UNAUTHENTICATED: "
        "Hostname Verification Check failed.",
        Cause.HOSTNAME,
    ),
    (U, LAST + "Peer name wrong.example is not in peer certificate", Cause.HOSTNAME),
    (
        U,
        LAST + "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
        "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
        "certificate: OK",
        Cause.UNKNOWN_CA,
    ),
    (
        U,
        LAST + "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
        "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK",
        Cause.EXPIRED,
    ),
    (
        U,
        LAST + "Failed to connect to remote host: Connection refused",
        Cause.UNREACHABLE,
    ),
    (
        U,
        "errors resolving nosuchhost.invalid:443: [field:hostname lookup error:address lookup "
        "failed for nosuchhost.invalid:443: Domain name not found]",
        Cause.UNREACHABLE,
    ),
    (U, "Socket closed", Cause.CLOSED),
    (D, "Deadline Exceeded", Cause.NO_ANSWER),
    (grpc.StatusCode.UNAUTHENTICATED, "certificate revoked", Cause.REVOKED),
]


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "cause"), REAL, ids=[c for *_, c in REAL])
def test_real_details_are_classified(code: grpc.StatusCode, details: str, cause: Cause) -> None:
    assert classify(code, details) is cause


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "the token was already used"),
        (grpc.StatusCode.PERMISSION_DENIED, "role 'client' may not call x/Y"),
        (D, "step 3 took too long"),  # a call that reached the service
        (U, "a service this call depends on is unavailable (restarting?); retry"),
        (grpc.StatusCode.INTERNAL, "Peer name x is not in peer certificate"),
    ],
)
def test_other_failures_are_left_to_the_caller(code: grpc.StatusCode, details: str) -> None:
    assert classify(code, details) is None
    assert call_failure(FakeRpcError(code, details), Endpoint("backbone", "h:1")) is None


def no_names(address: str) -> list[str] | None:
    return None


def test_a_hostname_mismatch_names_the_certificate_names_and_the_flag() -> None:
    endpoint = Endpoint("backbone", "10.0.0.5:7443", "wrong.example")
    line = explain(Cause.HOSTNAME, endpoint, names=lambda _: ["backbone-0", "10.0.0.5"])
    assert line == (
        "the certificate of the backbone at 10.0.0.5:7443 does not carry the name "
        "'wrong.example' (it has: backbone-0, 10.0.0.5): set server_name to one of those "
        "names, or re-enroll the backbone with a token from "
        "`splitfed keys token create ... --dns wrong.example`"
    )
    # No server_name: the host is the name, and an IP literal needs --ip.
    line = explain(Cause.HOSTNAME, Endpoint("aggregator", "127.0.0.1:9"), names=no_names)
    assert "the IP address '127.0.0.1': set server_name to a name it carries" in line
    assert line.endswith("--ip 127.0.0.1`")
    # The key manager's certificate comes from keys init.
    line = explain(Cause.HOSTNAME, Endpoint("key manager", "km:1"), names=no_names)
    assert line.endswith("make its certificate with `splitfed keys init ... --dns km`")


def test_every_cause_names_its_fix() -> None:
    endpoint = Endpoint("aggregator", "agg:7444", None, Path("/etc/splitfed/tls"))
    fixes = {
        Cause.UNKNOWN_CA: "/etc/splitfed/tls/ca.pem",
        Cause.EXPIRED: "`splitfed keys enroll`",
        Cause.REVOKED: "enroll again with a new token",
        Cause.CLOSED: "refuses this party's certificate",
        Cause.UNREACHABLE: "check that the service runs",
        Cause.NO_ANSWER: "did not answer in time",
    }
    for cause, fix in fixes.items():
        line = explain(cause, endpoint, names=no_names)
        assert fix in line and "agg:7444" in line and "\n" not in line, (cause, line)


def test_the_error_keeps_the_call_status_so_waiting_still_works() -> None:
    endpoint = Endpoint("aggregator", "agg:7444")
    refused = FakeRpcError(U, LAST + "Failed to connect to remote host: Connection refused")
    failure = call_failure(refused, endpoint, names=no_names)
    assert isinstance(failure, ConnectionFailedError) and isinstance(failure, grpc.RpcError)
    assert failure.code() is U and failure.cause is Cause.UNREACHABLE
    assert str(failure).startswith("nothing answers at agg:7444")
    assert is_retryable(failure)  # a restarting aggregator is waited out
    mismatch = FakeRpcError(U, LAST + "Hostname Verification Check failed.")
    failure = call_failure(mismatch, endpoint, names=no_names)
    assert isinstance(failure, ConnectionFailedError) and not is_retryable(failure)
    revoked = call_failure(
        FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "certificate revoked"), endpoint
    )
    assert isinstance(revoked, UnauthenticatedError) and "revoked" in str(revoked)
    assert call_failure(refused, None) is None  # nothing known of the other end


def test_a_finished_federation_shows_its_rounds_done() -> None:
    plan = aggregator_pb2.RoundPlan(round=3, rounds=2, phase=aggregator_pb2.ROUND_PHASE_FINISHED)
    assert round_text(plan) == "finished: 2/2 rounds"
    plan = aggregator_pb2.RoundPlan(round=2, rounds=2, phase=aggregator_pb2.ROUND_PHASE_UPLOAD)
    assert round_text(plan) == "2/2"


@pytest.mark.parametrize("details", ["Socket closed", "Connection reset by peer"])
def test_a_backbone_killed_under_a_stream_is_a_lost_stream(details: str) -> None:
    # What a SIGKILLed backbone leaves its clients (make chaos): waited out and redone
    # like any lost stream, not reported as a certificate refused.
    from splitfed.clients.backbone import StreamLostError, _translate

    endpoint = Endpoint("backbone", "backbone:7450")
    assert isinstance(_translate(FakeRpcError(U, details), endpoint), StreamLostError)
