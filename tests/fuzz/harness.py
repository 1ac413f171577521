"""Send one fuzz case to a live service and check the service afterwards.

A :class:`Case` is a call as raw bytes: the method, who calls (which certificate), the
request messages already serialised (identity serialisers: no client-side validation),
call metadata, and whether the client cancels part-way. :class:`Fuzzer` sends it and then
checks the properties every case must keep:

* the status is a clear refusal or OK: never INTERNAL or UNKNOWN, and never
  DEADLINE_EXCEEDED (the service hung) or UNAVAILABLE (it dropped the connection);
* the service process is alive and its health check over mTLS answers SERVING;
* its resident memory (VmRSS) stays under ``RSS_HEADROOM`` above what it held when the
  fuzzing started (see :data:`RSS_HEADROOM` for the bound and why).

Nothing here raises on a violation: :class:`Ledger` collects every case, every status
and every failure, so a long run reports all of them at the end.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fuzz.deploy import Deployment, Host
from google.protobuf import message_factory, text_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitfed.transport import TransportOptions, create_channel
from splitfed.v1 import aggregator_pb2, backbone_pb2, diagnostics_pb2, keys_pb2
from splitfed.wire import MiB

# Every call gets this long; a service that answers nothing within it hangs.
CALL_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 20.0
# The bound on a service's resident memory, above its RSS when fuzzing started. Every
# service here refuses tensors over 4 MiB (diagnostics) or its tiny model's activation
# size (backbone, 32 KiB), updates over 1 MiB (aggregator), and messages over 128 KiB
# (64 KiB chunks); its receive budgets are at most 64 MiB, and the glibc allocator of a
# "throughput" service keeps up to 64 MiB of freed memory per arena. 256 MiB covers a full
# receive budget, the allocator's slack and gRPC's buffers; growth past it is a leak or an
# unbounded allocation.
RSS_HEADROOM = 256 * MiB
# Codes a service must never answer a bad request with.
BAD_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
# The fuzz client may send what the services must refuse: messages up to 8 MiB.
CLIENT_OPTIONS = TransportOptions(chunk_bytes=8 * MiB)
_SERVICES = [
    backbone_pb2.DESCRIPTOR.services_by_name["Backbone"],
    aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"],
    keys_pb2.DESCRIPTOR.services_by_name["KeyManager"],
    diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"],
]
METHODS = {f"/{s.full_name}/{m.name}": m for s in _SERVICES for m in s.methods}


@dataclass(frozen=True)
class Case:
    host: str
    method: str
    identity: str
    messages: tuple[bytes, ...]
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    # The client cancels once this many messages went out (or the call ended).
    cancel_after: int | None = None
    # The client cancels once it read this many responses (endless streams).
    max_responses: int | None = None
    # What is hostile about the case, for the report.
    what: str = ""
    # "main" or "enroll" (the key manager's enrollment port, no client certificate).
    port: str = "main"

    @property
    def streaming(self) -> tuple[bool, bool]:
        method = METHODS[self.method]
        return method.client_streaming, method.server_streaming

    def describe(self, limit: int = 2000) -> str:
        method = METHODS[self.method]
        request_type = message_factory.GetMessageClass(method.input_type)
        parts = [
            f"{self.host} {self.method} as {self.identity or 'no certificate'}"
            + (f" ({self.what})" if self.what else "")
        ]
        if self.metadata:
            parts.append("  metadata: " + _short(repr(self.metadata), 300))
        if self.cancel_after is not None:
            parts.append(f"  client cancels after {self.cancel_after} messages")
        for index, raw in enumerate(self.messages[:8]):
            parts.append(f"  [{index}] " + _describe_message(request_type, raw))
        if len(self.messages) > 8:
            parts.append(f"  ... {len(self.messages) - 8} more messages")
        return _short("\n".join(parts), limit)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_message(request_type: type[Message], raw: bytes) -> str:
    try:
        message = request_type.FromString(raw)
    except DecodeError:
        return f"{len(raw)} raw bytes {raw[:48].hex()}"
    text = text_format.MessageToString(message, as_one_line=True, print_unknown_fields=True)
    # Long bytes fields: their length, not their contents.
    text = re.sub(r'data: "((?:[^"\\]|\\.){64})(?:[^"\\]|\\.)*"', r'data: "\1..."', text)
    return f"{len(raw)} bytes: " + _short(text, 400)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int = 0
    # The client ended the call itself (cancel_after / max_responses).
    client_cancelled: bool = False
    # The reply of a unary call that succeeded.
    response: bytes | None = None


@dataclass(frozen=True)
class Failure:
    case: Case
    outcome: Outcome
    problem: str
    # The known bug it matches (see known.py), if any.
    known: str | None = None

    def describe(self) -> str:
        tag = f" [known: {self.known}]" if self.known else ""
        return (
            f"FAIL {self.case.host}: {self.problem}{tag}\n"
            f"  status {self.outcome.code.name}: {_short(self.outcome.details, 300)}\n"
            + self.case.describe()
        )


@dataclass
class Ledger:
    """Every case sent, the statuses they got, and every failure."""

    cases: Counter[str] = field(default_factory=Counter)
    # (RPC, status) -> the details of the first case that got it: what refusals say.
    details: dict[tuple[str, str], str] = field(default_factory=dict)
    # host -> (RSS at the start, peak RSS, the bound now), from the last deployment.
    memory: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def record(self, case: Case, outcome: Outcome, failures: Sequence[Failure]) -> None:
        name = f"{case.host} {case.method.rsplit('/', 1)[1]}"
        self.cases[name] += 1
        self.codes[(name, outcome.code.name)] += 1
        self.details.setdefault((name, outcome.code.name), outcome.details)
        self.failures.extend(failures)

    def unknown_failures(self, since: int = 0) -> list[Failure]:
        return [f for f in self.failures[since:] if f.known is None]

    def refusals(self) -> str:
        """One example of what each RPC answered with each status."""
        return "\n".join(
            f"  {name} {code}: {_short(text, 160)}"
            for (name, code), text in sorted(self.details.items())
            if text
        )

    def summary(self) -> str:
        known = sum(1 for f in self.failures if f.known)
        lines = [
            f"fuzz: {self.total} cases, {len(self.failures)} failures ({known} of them known bugs)"
        ]
        for name in sorted(self.cases):
            codes = ", ".join(
                f"{code} {n}" for (where, code), n in sorted(self.codes.items()) if where == name
            )
            lines.append(f"  {name}: {self.cases[name]} cases ({codes})")
        for host, (start, peak, bound) in sorted(self.memory.items()):
            lines.append(
                f"  {host} resident memory: {start / MiB:.0f} MiB at the start, "
                f"peak {peak / MiB:.0f} MiB, bound at the end {bound / MiB:.0f} MiB"
            )
        return "\n".join(lines)


# The one ledger of a pytest run (its report: tests/fuzz/conftest.py).
LEDGER = Ledger()


class _Requests:
    """The request messages of a client stream; with ``cancel_after``, it stops after
    that many and waits (until :meth:`release`), so that the client can cancel mid-stream."""

    def __init__(self, messages: Sequence[bytes], cancel_after: int | None) -> None:
        self.messages = messages
        self.cancel_after = cancel_after
        self.sent = threading.Event()
        self._released = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        count = len(self.messages) if self.cancel_after is None else self.cancel_after
        yield from self.messages[:count]
        self.sent.set()
        if self.cancel_after is not None:
            self._released.wait(CALL_TIMEOUT_S)

    def release(self) -> None:
        self._released.set()


def read_rss(pid: int) -> int | None:
    """Resident bytes of ``pid`` (None once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    if re.search(r"^State:\s+Z", status, re.M):
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else None


class Fuzzer:
    """Sends cases to a :class:`Deployment` and checks the service after each."""

    def __init__(
        self,
        deployment: Deployment,
        ledger: Ledger,
        known: Callable[[Case, Outcome, str], str | None] = lambda *_: None,
    ) -> None:
        self.deployment = deployment
        self.ledger = ledger
        self.known = known
        self._channels: dict[tuple[str, str, str], grpc.Channel] = {}
        # Resident bytes per host: when fuzzing started, the base of the bound, the peak.
        self.start: dict[str, int] = {}
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def start_measuring(self) -> None:
        """Take each service's resident memory now as the base of its bound."""
        for name, host in self.deployment.hosts.items():
            rss = read_rss(host.pid)
            assert rss is not None, f"{name} is not running"
            self.start[name] = self.baseline[name] = self.peak[name] = rss

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def channel(self, host: str, identity: str, port: str = "main") -> grpc.Channel:
        key = (host, identity, port)
        channel = self._channels.get(key)
        if channel is None:
            target = self.deployment.hosts[host]
            if port == "enroll":
                # Server-authenticated TLS only, as a party that has no certificate yet.
                credentials = grpc.ssl_channel_credentials(self.deployment.ca.cert_pem)
                channel = grpc.secure_channel(
                    target.extra["enroll"],
                    credentials,
                    [
                        *CLIENT_OPTIONS.channel_options(),
                        ("grpc.ssl_target_name_override", target.server_name),
                    ],
                )
            else:
                channel = create_channel(
                    target.address,
                    self.deployment.tls[identity],
                    server_name=target.server_name,
                    options=CLIENT_OPTIONS,
                )
            self._channels[key] = channel
        return channel

    # --- sending ---------------------------------------------------------------------

    def send(self, case: Case) -> Outcome:
        for key, value in case.metadata:
            # What gRPC itself refuses to send is a harness bug, not a finding.
            assert isinstance(value, bytes) == key.endswith("-bin"), (key, value)
            assert isinstance(value, bytes) or all(" " <= c <= "~" for c in value), (key, value)
        channel = self.channel(case.host, case.identity, case.port)
        metadata = case.metadata or None
        client_streaming, server_streaming = case.streaming
        try:
            if not client_streaming:
                if not server_streaming:
                    reply = channel.unary_unary(case.method)(
                        case.messages[0], timeout=CALL_TIMEOUT_S, metadata=metadata
                    )
                    return Outcome(grpc.StatusCode.OK, "", 1, response=reply)
                call = channel.unary_stream(case.method)(
                    case.messages[0], timeout=CALL_TIMEOUT_S, metadata=metadata
                )
                return self._drain(call, case)
            requests = _Requests(case.messages, case.cancel_after)
            try:
                if not server_streaming:
                    future = channel.stream_unary(case.method).future(
                        iter(requests), timeout=CALL_TIMEOUT_S, metadata=metadata
                    )
                    if case.cancel_after is not None:
                        self._cancel_when_sent(future, requests)
                    try:
                        reply = future.result()
                    except grpc.FutureCancelledError:
                        return Outcome(grpc.StatusCode.CANCELLED, "", 0, client_cancelled=True)
                    return Outcome(grpc.StatusCode.OK, "", 1, response=reply)
                call = channel.stream_stream(case.method)(
                    iter(requests), timeout=CALL_TIMEOUT_S, metadata=metadata
                )
                if case.cancel_after is not None and self._cancel_when_sent(call, requests):
                    return Outcome(grpc.StatusCode.CANCELLED, "", 0, client_cancelled=True)
                return self._drain(call, case)
            finally:
                requests.release()
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "")

    @staticmethod
    def _cancel_when_sent(call: grpc.Future, requests: _Requests) -> bool:  # type: ignore[type-arg]
        """Cancel ``call`` once its requests went out, unless it ended first; True if the
        client cancelled it."""
        call.add_done_callback(lambda _: requests.sent.set())
        requests.sent.wait(CALL_TIMEOUT_S)
        return bool(call.cancel())

    @staticmethod
    def _drain(call: Iterator[object], case: Case) -> Outcome:
        count = 0
        for _ in call:
            count += 1
            if case.max_responses is not None and count >= case.max_responses:
                call.cancel()  # type: ignore[attr-defined]
                return Outcome(grpc.StatusCode.CANCELLED, "", count, client_cancelled=True)
        return Outcome(grpc.StatusCode.OK, "", count)

    # --- checking --------------------------------------------------------------------

    def health(self, host: Host) -> str | None:
        """None if ``host`` answers SERVING over mTLS, else what is wrong."""
        stub = health_pb2_grpc.HealthStub(self.channel(host.name, "fuzz-a"))
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError as err:
            return f"health check failed: {err.code().name} {err.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            return f"health check says {status}"
        return None

    def check(self, case: Case, outcome: Outcome) -> list[Failure]:
        host = self.deployment.hosts[case.host]
        problems = []
        if outcome.code in BAD_CODES:
            problems.append(f"status {outcome.code.name}")
        rss = read_rss(host.pid)
        if rss is None:
            problems.append("the service process exited")
        else:
            self.peak[case.host] = max(self.peak.get(case.host, 0), rss)
            bound = self.baseline[case.host] + RSS_HEADROOM
            self.ledger.memory[case.host] = (self.start[case.host], self.peak[case.host], bound)
            if rss > bound:
                problems.append(
                    f"resident memory {rss / MiB:.0f} MiB exceeds its bound {bound / MiB:.0f} MiB"
                )
                # Reported once: later cases are measured from here (a freed allocation
                # may stay in the allocator's heap), not blamed for this one.
                self.baseline[case.host] = rss
            unhealthy = self.health(host)
            if unhealthy:
                problems.append(unhealthy)
        failures = []
        for problem in problems:
            failures.append(Failure(case, outcome, problem, self.known(case, outcome, problem)))
        return failures

    def run(self, case: Case) -> Outcome:
        outcome = self.send(case)
        self.ledger.record(case, outcome, self.check(case, outcome))
        return outcome


def request_type(method: str) -> type[Message]:
    return message_factory.GetMessageClass(METHODS[method].input_type)


def method_path(service: str, name: str) -> str:
    for path in METHODS:
        if path == f"/splitfed.v1.{service}/{name}":
            return path
    raise KeyError(f"no method {service}/{name}")
