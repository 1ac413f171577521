"""`make chaos`: federated runs (3 clients x 3 rounds, real processes) with services
killed by SIGKILL at seeded random moments, until enough kills have happened.

Runs each mode's federation once without kills (its reference), then one run per seed
(``--seed``, ``--seed + 1``, ...), each killing every service once in an order and at
moments drawn from its seed (tests/chaos_kit.py says how, and what each run must
satisfy), until ``--kills`` kills have happened. Modes alternate by seed: plain FedAvg
(where a client is killed too) and secure aggregation, both with sealed activations and
the key manager. Prints every
kill as it happens, one line per run, and a summary line; exits 1 if any run failed a
check or fewer kills than asked happened.

    nice .venv/bin/python tests/chaos/run.py --kills 10
    nice .venv/bin/python tests/chaos/run.py --seed 7 --runs 1 --keep   # replay one seed
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the tiny checkpoints' writes

from chaos_kit import (
    KillRecord,
    Settings,
    check_run,
    run_federation,
    schedule,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="stop once this many happened")
    parser.add_argument("--runs", type=int, default=20, help="at most this many chaos runs")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="plain,secure",
        help="comma-separated, taken in turn by seed: plain, secure (secure aggregation)",
    )
    parser.add_argument("--no-keymanager", action="store_true", help="plain activations")
    parser.add_argument(
        "--kill-clients",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="plain runs kill a client too (restarted, it resumes from its checkpoint)",
    )
    parser.add_argument("--root", type=Path, help="keep every run's files under this folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"plain", "secure"}:
        parser.error(f"--modes takes plain and/or secure, got {args.modes!r}")
    settings_of = {
        mode: Settings(
            rounds=args.rounds,
            keymanager=not args.no_keymanager,
            secure_aggregation=mode == "secure",
            kill_clients=args.kill_clients and mode == "plain",
        )
        for mode in modes
    }
    root = args.root or Path(tempfile.mkdtemp(prefix="splitfed-chaos-"))
    started = time.monotonic()
    any_settings = settings_of[modes[0]]
    print(
        f"chaos: {any_settings.clients} clients x {any_settings.rounds} rounds, modes "
        f"{', '.join(modes)}, services {', '.join(any_settings.services)}; files under {root}",
        flush=True,
    )

    references = {}
    for mode, settings in settings_of.items():
        reference = run_federation(root / f"reference-{mode}", settings, [])
        findings = check_run(reference)
        verdict = "ok" if not findings else "FAILED"
        print(f"reference {mode} (no kills): {reference.seconds:.0f}s, {verdict}", flush=True)
        for problem in findings.problems:
            print(f"  {problem}")
        if findings:
            print("chaos: a run without kills fails its checks; nothing else was run")
            return 1
        references[mode] = reference

    def show(record: KillRecord) -> None:
        print(f"  {record}", flush=True)

    kills: list[KillRecord] = []
    runs_by_mode: Counter[str] = Counter()
    runs, failed, lost, doubled, redone = 0, 0, 0, 0, 0
    seed = args.seed
    while len(kills) < args.kills and runs < args.runs:
        mode = modes[seed % len(modes)]
        settings = settings_of[mode]
        plan = schedule(seed, settings)
        order = ", ".join(k.service for k in plan)
        print(f"run {runs + 1} (seed {seed}, {mode}): {order}", flush=True)
        outcome = run_federation(root / f"seed-{seed}", settings, plan, seed=seed, on_kill=show)
        findings = check_run(outcome, references[mode])
        runs += 1
        runs_by_mode[mode] += 1
        kills += outcome.kills
        lost += findings.lost
        doubled += findings.doubled
        redone += len(findings.redone)
        for kill in outcome.missed:
            print(f"  not killed: {kill.service} ({kill.moment}): the federation finished first")
        for name, round_ in sorted(findings.redone.items()):
            print(f"  {name} trained round {round_} more than once (checked as such)")
        for problem in findings.problems:
            print(f"  FAILED: {problem}")
        failed += bool(findings)
        verdict = "FAILED" if findings else "ok"
        print(
            f"  run {runs} (seed {seed}, {mode}): {len(outcome.kills)} kills, "
            f"{outcome.seconds:.0f}s, {verdict}",
            flush=True,
        )
        seed += 1
    by_service = Counter(k.kill.kind for k in kills)
    kinds = [*any_settings.services, *(["client"] if args.kill_clients else [])]
    print(
        f"chaos: {len(kills)} kills ("
        + ", ".join(f"{s} {by_service[s]}" for s in dict.fromkeys(kinds))
        + f") in {runs} runs ("
        + ", ".join(f"{m} {runs_by_mode[m]}" for m in modes)
        + f"); {runs - failed} runs passed, {failed} failed; "
        f"updates lost {lost}, doubled {doubled}; clients that redid a round {redone}; "
        f"{time.monotonic() - started:.0f}s",
        flush=True,
    )
    if args.root is None and not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif args.root is None:
        print(f"chaos: files kept under {root}")
    return 1 if failed or len(kills) < args.kills else 0


if __name__ == "__main__":
    sys.exit(main())
