"""Chaos: a federated run with real processes during which services are killed with
SIGKILL at seeded random moments and restarted on the same port.

One module on purpose (it is long): the schedule, the driver that carries it out and the
checks of what a run left share the run's types and are read together; `make chaos`
(tests/chaos/run.py) and the sample in `make test` (tests/integration/test_chaos.py)
both use it.

A *run* is the kit's federation (tests/federated_kit.py): a backbone, an aggregator,
optionally a key manager (then every client's activations are sealed and its session key
rotates at every step, so the key manager is used all through training), and clients
as ``splitfed train`` processes with a [federated] section; plain FedAvg or secure
aggregation (masked updates, with a keys phase). A seeded RNG draws the run's
*schedule*: the services (and, with ``kill_clients``, one client) in a random order, each
killed once, each at a *moment* on the
run's progress: after the n-th training step the backbone has applied (read from its
session store: mid-training), after the n-th update the aggregator has counted (its
state.json history plus its running sum), or a delay after the previous restart. The
driver waits for each moment by polling those files, kills the service (SIGKILL), and
restarts it on the same address; a start that fails is a finding (tried up to
RESTART_TRIES times; the run ends if none succeeds).

What :func:`check_run` asserts of a run, and why each holds:

* it finishes: every service restarts at its first try, every client exits 0, the
  federation is at its last version;
* no update is lost or counted twice: each version's metadata names every selected client
  once with its samples, and the version's offset step is the sample-weighted average of
  the updates the clients recorded (``record_updates``; their copy of what they sent for
  the attempt the aggregator closed), rtol 1e-5. The multiplicity of each update in the
  sum is solved for (least squares over all tensor elements): 1 for each, or the update
  was lost (0) or doubled (2);
* equal to a run without kills (the *reference*, same configs): a killed backbone
  resumes each session from the step it checkpointed and the client redoes a lost step
  from the same data and weights, a killed aggregator resumes its durable round and a
  client re-sends the same update, a killed key manager is waited out; none of them
  changes what any client computes. So each client's update of every round, and every
  global version, equals the reference's (rtol 1e-5: the aggregator sums in float32 in
  the order updates arrive, which differs between runs; with secure aggregation the sum
  is exact in fixed point).
  A killed client restarts with the same config and resumes from its checkpoint (its
  session, optimizer and step; a step the backbone applied before the client could
  checkpoint it is finished from the gradients written ahead): killed while it waited
  or uploaded, it goes on exactly as before, and all of the above holds. Killed during
  a round's local steps, it trains that round again from the global version (the local
  steps done are lost with the process, while its optimizer, data order and body adapter
  have moved on). Where a client so trained a round more than once (its record's
  ``steps`` is not round x local_steps), only this stays equal: the rounds before that
  round, and that round's updates of the clients that did not redo it; later rounds
  start from another global and are checked only by the averaging identity above.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from federated_kit import Federation, federation, split_dataset, write_toml
from helpers import fresh_log
from safetensors import safe_open
from safetensors.torch import load_file
from security_kit import KEK
from security_kit import SERVER_NAME as KEYMANAGER_NAME

from splitfed.cli.launcher import ServiceProcess, ServiceStartError
from splitfed.security.ca import CertificateAuthority
from splitfed.services.backbone.store import DirectoryStore
from splitfed.services.keymanager.authority import init_authority

NAMES = ["hospital-a", "hospital-b", "bank-c"]
SIZES = [6, 10, 16]  # each client's examples: the sample weights
SERVICES = ("backbone", "aggregator", "keymanager")
RTOL, ATOL = 1e-5, 1e-6
POLL_S = 0.05
RESTART_TRIES = 3
# Runs may go side by side in threads (a reference beside a chaos run); the tiny model
# each run builds is seeded through torch's global RNG, so one is built at a time.
_MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    clients: int = 3
    local_steps: int = 2
    keymanager: bool = True  # sealed activations, session keys rotated at every step
    secure_aggregation: bool = False  # masked updates: the keys, upload and reveal phases
    # Kill a client too (restarted with the same config, it resumes from its checkpoint).
    kill_clients: bool = False

    def __post_init__(self) -> None:
        if self.kill_clients and self.secure_aggregation:
            raise ValueError(
                "kill_clients with secure aggregation: a restarted client has no key for "
                "the round's attempt, so the round waits for its deadline; not run here"
            )

    @property
    def names(self) -> list[str]:
        return NAMES[: self.clients]

    @property
    def services(self) -> tuple[str, ...]:
        services = SERVICES if self.keymanager else SERVICES[:2]
        return (*services, "client") if self.kill_clients else services

    @property
    def total_steps(self) -> int:
        return self.rounds * self.clients * self.local_steps

    @property
    def total_updates(self) -> int:
        return self.rounds * self.clients


@dataclass(frozen=True)
class Moment:
    """``kind``: "step" (the backbone has applied ``value`` steps in all), "upload" (the
    aggregator has counted ``value`` updates in all) or "delay" (``value`` seconds after
    the previous restart, or the clients' start)."""

    kind: str
    value: float

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"{self.value:.1f}s after the previous restart"
        return f"after {self.kind} {int(self.value)}"


@dataclass(frozen=True)
class Kill:
    """``service``: backbone, aggregator, keymanager, or ``client:<name>``."""

    service: str
    moment: Moment

    @property
    def kind(self) -> str:
        return self.service.split(":", 1)[0]


def schedule(seed: int, settings: Settings, services: tuple[str, ...] | None = None) -> list[Kill]:
    """Each of ``services`` (default: all of the run's) killed once, in an order and at
    moments drawn from ``seed``; moments spread over the run in the order of the kills."""
    rng = random.Random(seed)
    chosen = list(services or settings.services)
    rng.shuffle(chosen)
    fractions = sorted(rng.uniform(0.05, 0.85) for _ in chosen)
    kills = []
    for chosen_service, fraction in zip(chosen, fractions, strict=True):
        service = chosen_service
        if service == "client":
            service = f"client:{rng.choice(settings.names)}"
        kind = rng.choice(["step", "upload", "delay"])
        if kind == "step":
            value = float(max(1, math.ceil(fraction * settings.total_steps)))
        elif kind == "upload":
            value = float(max(1, math.ceil(fraction * settings.total_updates)))
        else:
            value = round(rng.uniform(0.3, 2.0), 1)
        kills.append(Kill(service, Moment(kind, value)))
    return kills


@dataclass(frozen=True)
class Progress:
    steps: int
    updates: int
    version: int
    phase: str

    def __str__(self) -> str:
        return (
            f"{self.steps} steps applied, {self.updates} updates counted, "
            f"version {self.version} ({self.phase})"
        )


@dataclass
class KillRecord:
    seed: int
    kill: Kill
    at: Progress
    restart_s: float
    failed_starts: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        tries = f" (start {len(self.failed_starts) + 1})" if self.failed_starts else ""
        return (
            f"kill {self.kill.service} (seed {self.seed}, {self.kill.moment}): at "
            f"{self.at}; back in {self.restart_s:.1f}s{tries}"
        )


class KeyManager:
    """A key manager process (``splitfed serve keymanager``) over the kit's CA."""

    def __init__(self, root: Path, ca: CertificateAuthority) -> None:
        self.root = root
        init_authority(root / "km", KEK.encode(), ca=ca, admin_dir=root / "km-admin")
        self.config = write_toml(
            root / "keymanager.toml", {"keymanager": {"state_dir": root / "km"}}
        )
        self.process: ServiceProcess | None = None
        self.enroll_address = ""

    def start(self) -> str:
        args = ["serve", "keymanager", "--config", str(self.config)]
        if self.process is not None and self.process.address:
            args += ["--listen", self.process.address, "--enroll-listen", self.enroll_address]
        env = {**os.environ, "SPLITFED_KEK": KEK}
        log = fresh_log(self.root / "keymanager.log")
        process = ServiceProcess("keymanager", args, log_path=log, env=env)
        address = process.start(timeout_s=60)  # if it fails, the next try keeps the ports
        self.process = process
        self.enroll_address = next(
            line.removeprefix("enrollment on ")
            for line in process.preamble
            if line.startswith("enrollment on ")
        )
        return address

    @property
    def address(self) -> str:
        assert self.process is not None and self.process.address
        return self.process.address

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Run:
    """One federation, its processes, and what it left on disk."""

    root: Path
    settings: Settings
    fed: Federation
    keymanager: KeyManager | None
    configs: dict[str, Path] = field(default_factory=dict)
    # Each client's log (its latest process's, after a restart).
    logs: dict[str, Path] = field(default_factory=dict)

    def start_client(self, name: str) -> None:
        """Start ``name`` (again, after a kill: in its place, with a new log)."""
        log = fresh_log(self.root / f"{name}.log")
        self.fed.run_client(self.configs[name], log.stem)
        self.logs[name] = log
        index = self.settings.names.index(name)
        if index < len(self.fed.clients) - 1:
            self.fed.clients[index] = self.fed.clients.pop()

    # --- the services -----------------------------------------------------------------

    def process(self, service: str) -> ServiceProcess:
        if service == "backbone":
            found = self.fed.backbone.process
        elif service == "aggregator":
            found = self.fed.aggregator
        else:
            found = self.keymanager.process if self.keymanager is not None else None
        assert found is not None, service
        return found

    def _start(self, service: str) -> None:
        if service == "backbone":
            self.fed.backbone.start()
        elif service == "aggregator":
            self.fed.start_aggregator()
        else:
            assert self.keymanager is not None
            self.keymanager.start()

    def kill_and_restart(self, service: str) -> tuple[float, list[str]]:
        """SIGKILL ``service``, restart it on its address (up to RESTART_TRIES starts);
        returns the seconds it was gone and each failed start (a finding). Raises
        ``ServiceStartError`` if it would not start at all. A client is restarted with
        the same config (its checkpoint directory)."""
        if service.startswith("client:"):
            name = service.split(":", 1)[1]
            client = self.fed.clients[self.settings.names.index(name)]
            killed = time.monotonic()
            if client.poll() is None:
                os.kill(client.pid, signal.SIGKILL)
            client.wait()
            self.start_client(name)
            return time.monotonic() - killed, []
        process = self.process(service)
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        process.stop()  # reaps it (already dead), closes its pipes and log
        failures: list[str] = []
        for _ in range(RESTART_TRIES):
            try:
                self._start(service)
                return time.monotonic() - killed, failures
            except ServiceStartError as exc:
                failures.append(f"{service} did not restart: {exc}")
        raise ServiceStartError("; ".join(failures))

    # --- progress, from the services' durable state -----------------------------------

    def state(self) -> dict[str, Any]:
        path = self.root / "aggregator-state" / "fed" / "state.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def progress(self) -> Progress:
        steps = 0
        store = DirectoryStore(self.fed.backbone.root / "state")
        with contextlib.suppress(OSError, LookupError, ValueError):  # written as it is read
            steps = sum(record.step for record in store.records())
        state = self.state()
        updates = sum(len(h["contributors"]) for h in state.get("history", []))
        sum_file = self.root / "aggregator-state" / "fed" / "sum.safetensors"
        # Absent between rounds, replaced as it is read (safetensors says RuntimeError).
        with contextlib.suppress(OSError, RuntimeError, KeyError, ValueError):
            with safe_open(str(sum_file), framework="pt") as handle:
                meta = handle.metadata()
            if (int(meta["round"]), int(meta["attempt"])) == (
                state.get("round"),
                state.get("attempt"),
            ):
                updates += len(json.loads(meta["contributors"]))
        return Progress(steps, updates, int(state.get("version", 0)), str(state.get("phase", "")))

    def reached(self, moment: Moment, since: float) -> bool:
        if moment.kind == "delay":
            return time.monotonic() - since >= moment.value
        progress = self.progress()
        done = progress.steps if moment.kind == "step" else progress.updates
        return done >= moment.value

    def clients_running(self) -> bool:
        return any(p.poll() is None for p in self.fed.clients)

    def stop(self) -> None:
        self.fed.stop()
        if self.keymanager is not None:
            self.keymanager.stop()


def start_run(root: Path, settings: Settings) -> Run:
    """The services and the clients' configs; the clients are not started yet."""
    root.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("chaos CA")
    keymanager = None
    backbone_options: dict[str, Any] = {}
    security: dict[str, Any] | None = None
    if settings.keymanager:
        keymanager = KeyManager(root, ca)
        keymanager.start()
        security = {"keymanager": keymanager.address, "keymanager_server_name": KEYMANAGER_NAME}
        backbone_options["security"] = {**security, "revocation_poll_s": 5.0}
    try:
        with _MODEL_LOCK:
            fed = federation(
                root,
                ca=ca,
                backbone_options=backbone_options,
                rounds=settings.rounds,
                min_clients=settings.clients,
                local_steps=settings.local_steps,
                secure_aggregation=settings.secure_aggregation,
                # Generous: a round that passed its deadline is retried and its clients
                # train it again, which is not what this suite is about.
                deadline_s=600.0,
            )
    except BaseException:
        if keymanager is not None:
            keymanager.stop()
        raise
    run = Run(root, settings, fed, keymanager)
    data = split_dataset(root, SIZES[: settings.clients])
    training: dict[str, Any] = {}
    if settings.keymanager:
        training = {"encrypted": True, "rotate_key_every_steps": 1}
    for name, path in zip(settings.names, data, strict=True):
        if settings.kill_clients:
            training["checkpoint_dir"] = root / "checkpoints" / name
        run.configs[name] = fed.client_config(name, path, security=security, **training)
    return run


@dataclass
class Outcome:
    """What a run left: exit codes, versions, recorded updates, the aggregator's history."""

    settings: Settings
    exit_codes: dict[str, int | None]
    logs: dict[str, str]
    state: dict[str, Any]
    # version -> (tensors, contributors from its metadata)
    versions: dict[int, tuple[dict[str, torch.Tensor], dict[str, int]]]
    # client -> round -> (tensors, samples, steps), for the attempt the round closed with
    updates: dict[str, dict[int, tuple[dict[str, torch.Tensor], int, int]]]
    kills: list[KillRecord] = field(default_factory=list)
    missed: list[Kill] = field(default_factory=list)
    seconds: float = 0.0
    # What the driver saw go wrong (a service that would not restart).
    problems: list[str] = field(default_factory=list)


def _read_updates(
    directory: Path, attempts: dict[int, int]
) -> dict[int, tuple[dict[str, torch.Tensor], int, int]]:
    out = {}
    for round_, attempt in attempts.items():
        path = directory / f"round{round_}-attempt{attempt}.safetensors"
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        out[round_] = (load_file(str(path)), int(meta["samples"]), int(meta.get("steps", -1)))
    return out


def collect(
    run: Run, kills: list[KillRecord], missed: list[Kill], seconds: float, problems: list[str]
) -> Outcome:
    state = run.state()
    attempts = {int(h["round"]): int(h["attempt"]) for h in state.get("history", [])}
    versions = {}
    for version in range(1, int(state.get("version", 0)) + 1):
        path = run.root / "aggregator-state" / "fed" / "versions" / f"v{version}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            listed = json.loads(handle.metadata()["contributors"])
        contributors = {k: int(v) for k, v in listed.items()}
        versions[version] = (load_file(str(path)), contributors)
    names = run.settings.names
    return Outcome(
        settings=run.settings,
        exit_codes={n: p.poll() for n, p in zip(names, run.fed.clients, strict=True)},
        logs={n: run.logs[n].read_text() for n in names},
        state=state,
        versions=versions,
        updates={n: _read_updates(run.root / "updates" / n, attempts) for n in names},
        kills=kills,
        missed=missed,
        seconds=seconds,
        problems=problems,
    )


def run_federation(
    root: Path,
    settings: Settings,
    kills: list[Kill],
    *,
    seed: int = 0,
    timeout_s: float = 900.0,
    on_kill: Callable[[KillRecord], None] | None = None,
) -> Outcome:
    """Run the federation to its end, killing and restarting services per ``kills``."""
    started = time.monotonic()
    run = start_run(root, settings)
    done: list[KillRecord] = []
    missed: list[Kill] = []
    problems: list[str] = []
    try:
        for name in settings.names:
            run.start_client(name)
        since = time.monotonic()
        deadline = started + timeout_s
        for index, kill in enumerate(kills):
            while not run.reached(kill.moment, since):
                if not run.clients_running() or time.monotonic() > deadline:
                    missed.extend(kills[index:])
                    break
                time.sleep(POLL_S)
            else:
                at = run.progress()
                if at.phase == "finished":  # a kill now would test nothing of the run
                    missed.extend(kills[index:])
                    break
                try:
                    gone_s, failed_starts = run.kill_and_restart(kill.service)
                except ServiceStartError as exc:
                    problems.append(str(exc))
                    deadline = time.monotonic()  # the run cannot go on: end it
                    break
                record = KillRecord(seed, kill, at, gone_s, failed_starts)
                problems += failed_starts
                done.append(record)
                if on_kill is not None:
                    on_kill(record)
                since = time.monotonic()
                continue
            break
        for process in run.fed.clients:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a client that never finishes: a finding
                process.kill()
                process.wait()
        return collect(run, done, missed, time.monotonic() - started, problems)
    finally:
        run.stop()


# --- checks -------------------------------------------------------------------------


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    lost: int = 0
    doubled: int = 0
    # client -> the first round it trained more than once (checked per the module doc)
    redone: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.problems)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL))


def _multiplicities(
    step: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], int]], total: int
) -> list[float]:
    """How many times each update is in ``step * total`` (least squares)."""
    names = sorted(step)
    target = torch.cat([step[n].double().reshape(-1) for n in names]) * total
    columns = [
        torch.cat([delta[n].double().reshape(-1) for n in names]) * samples
        for delta, samples in updates
    ]
    matrix = torch.stack(columns, dim=1)
    solution = torch.linalg.lstsq(matrix, target.unsqueeze(1)).solution
    return [float(x) for x in solution.squeeze(1)]


def check_run(outcome: Outcome, reference: Outcome | None = None) -> Findings:
    """Everything the module doc promises of ``outcome``; ``reference``: the same run
    without kills."""
    found = Findings(problems=list(outcome.problems))
    settings = outcome.settings
    names = settings.names
    for name, code in outcome.exit_codes.items():
        if code != 0:
            found.problems.append(f"{name} exited {code}: {outcome.logs[name][-1500:]}")
    state = outcome.state
    if state.get("phase") != "finished" or int(state.get("version", 0)) != settings.rounds:
        found.problems.append(
            f"the federation stopped at version {state.get('version')} ({state.get('phase')})"
        )
    samples = dict(zip(names, SIZES, strict=False))
    previous: dict[str, torch.Tensor] = {}
    for version, (offset, contributors) in sorted(outcome.versions.items()):
        where = f"version {version}"
        if contributors != samples:
            missing = sorted(set(names) - set(contributors))
            found.lost += len(missing)
            found.problems.append(f"{where}: contributors {contributors}, expected {samples}")
        recorded = [outcome.updates[n].get(version) for n in names]
        if any(r is None for r in recorded):
            absent = [n for n, r in zip(names, recorded, strict=True) if r is None]
            found.problems.append(f"{where}: no recorded update of {absent}")
            previous = offset
            continue
        uploads = [(r[0], r[1]) for r in recorded if r is not None]
        for name, r in zip(names, recorded, strict=True):
            assert r is not None
            if r[2] != version * settings.local_steps and name not in found.redone:
                found.redone[name] = version
        step = {n: v - previous.get(n, torch.zeros_like(v)) for n, v in offset.items()}
        total = sum(s for _, s in uploads)
        expected = {n: sum(d[n] * s for d, s in uploads) / total for n in step}
        if not all(_close(step[n], expected[n]) for n in step):
            counts = _multiplicities(step, uploads, total)
            rounded = dict(zip(names, [round(c, 3) for c in counts], strict=True))
            found.lost += sum(1 for c in counts if abs(c) < 0.5)
            found.doubled += sum(1 for c in counts if c > 1.5)
            found.problems.append(
                f"{where}: the step is not the sample-weighted average of the recorded "
                f"updates; multiplicities {rounded}"
            )
        previous = offset
    if reference is not None:
        _compare(outcome, reference, found)
    return found


def _compare(outcome: Outcome, reference: Outcome, found: Findings) -> None:
    """Equal to the run without kills, as far as the module doc says it must be."""
    names = outcome.settings.names
    first_redo = min(found.redone.values(), default=outcome.settings.rounds + 1)
    for version in range(1, outcome.settings.rounds + 1):
        if version > first_redo:
            break
        for name in names:
            if found.redone.get(name) == version:
                continue  # this client trained the round twice: its update differs
            mine = outcome.updates[name].get(version)
            theirs = reference.updates[name].get(version)
            if mine is None or theirs is None:
                continue  # reported by check_run
            if not all(_close(mine[0][t], theirs[0][t]) for t in theirs[0]):
                found.problems.append(
                    f"round {version}: the update of {name} differs from the run without kills"
                )
        if version < first_redo and version in outcome.versions and version in reference.versions:
            mine_v, theirs_v = outcome.versions[version][0], reference.versions[version][0]
            if not all(_close(mine_v[t], theirs_v[t]) for t in theirs_v):
                found.problems.append(f"version {version} differs from the run without kills")
