"""Hostile messages over mTLS to the running backbone, aggregator, key manager and
diagnostics (tests/fuzz/deploy.py starts them once for this module).

After every case: the status is not INTERNAL, UNKNOWN, DEADLINE_EXCEEDED or UNAVAILABLE,
the service process lives and answers SERVING, and its resident memory stays within
``RSS_HEADROOM`` of where it started (tests/fuzz/harness.py). `make test` sends a bounded
sample (tests/fuzz/budget.py); `make fuzz` sends SPLITFED_FUZZ_EXAMPLES cases."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import grpc
import pytest
from fuzz import cases, deploy, known
from fuzz.budget import full_run, fuzz_settings
from fuzz.harness import LEDGER, Case, Fuzzer, Outcome
from fuzz.live import TIMEOUT_S, Live
from hypothesis import given
from hypothesis import strategies as st

from splitfed.v1 import backbone_pb2, backbone_pb2_grpc

# The share of the cases each test sends.
WEIGHTS = {
    "backbone_train": 30,
    "backbone_generate": 20,
    "backbone_import": 15,
    "backbone_export": 6,
    "backbone_open": 15,
    "backbone_close": 5,
    "aggregator_upload": 30,
    "aggregator_join": 4,
    "aggregator_plan": 4,
    "aggregator_advertise": 6,
    "aggregator_reveal": 6,
    "aggregator_download": 6,
    "aggregator_watch": 4,
    "keymanager_enroll": 10,
    "keymanager_renew": 8,
    "keymanager_create_token": 6,
    "keymanager_revoke": 5,
    "keymanager_read": 4,
    "keymanager_session_keys": 10,
    "diagnostics_echo": 30,
    "raw_bytes": 30,
    "metadata": 15,
}
TOTAL_WEIGHT = sum(WEIGHTS.values())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with deploy.running(tmp_path_factory.mktemp("fuzz")) as deployment:
        fuzzer = Fuzzer(deployment, LEDGER, known=known.match)
        live = Live(fuzzer)
        live.prepare()
        fuzzer.start_measuring()
        yield live
        fuzzer.close()


def fuzz(
    live: Live,
    name: str,
    strategy: st.SearchStrategy[Case],
    after: Callable[[Case, Outcome], None] | None = None,
) -> None:
    """Send this test's share of cases; fail with every failure (known bugs are listed
    only in a full run)."""
    since = len(LEDGER.failures)

    @fuzz_settings(WEIGHTS[name], TOTAL_WEIGHT)
    @given(case=strategy)
    def run(case: Case) -> None:
        outcome = live.fuzzer.run(case)
        if after is not None:
            after(case, outcome)

    run()
    failures = LEDGER.failures[since:] if full_run() else LEDGER.unknown_failures(since)
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(
        f.describe() for f in failures[:20]
    )


# --- backbone -----------------------------------------------------------------------------


def test_backbone_train(live: Live) -> None:
    fuzz(live, "backbone_train", cases.train_cases(live))


def test_backbone_generate(live: Live) -> None:
    fuzz(live, "backbone_generate", cases.generate_cases(live))


def test_backbone_import_adapter(live: Live) -> None:
    fuzz(live, "backbone_import", cases.import_cases(live))


def test_backbone_export_adapter(live: Live) -> None:
    fuzz(live, "backbone_export", cases.export_cases(live))


def test_backbone_open_session(live: Live) -> None:
    def close_opened(case: Case, outcome: Outcome) -> None:
        # Sessions a case opened are closed again: the backbone's session limit stays
        # free for the next cases. A resumed session is one the other tests use.
        if outcome.code != grpc.StatusCode.OK or outcome.response is None:
            return
        reply = backbone_pb2.OpenSessionResponse.FromString(outcome.response)
        if not reply.resumed:
            stub = backbone_pb2_grpc.BackboneStub(live.fuzzer.channel("backbone", case.identity))
            stub.CloseSession(
                backbone_pb2.CloseSessionRequest(session_id=reply.session_id), timeout=TIMEOUT_S
            )

    fuzz(live, "backbone_open", cases.open_cases(live), after=close_opened)


def test_backbone_close_session(live: Live) -> None:
    fuzz(live, "backbone_close", cases.close_cases(live))


# --- aggregator ---------------------------------------------------------------------------


def test_aggregator_upload_update(live: Live) -> None:
    fuzz(live, "aggregator_upload", cases.upload_cases(live))


def test_aggregator_join(live: Live) -> None:
    fuzz(live, "aggregator_join", cases.join_cases(live))


def test_aggregator_round_plan(live: Live) -> None:
    fuzz(live, "aggregator_plan", cases.plan_cases(live))


def test_aggregator_advertise_key(live: Live) -> None:
    fuzz(live, "aggregator_advertise", cases.advertise_cases(live))


def test_aggregator_reveal_seeds(live: Live) -> None:
    fuzz(live, "aggregator_reveal", cases.reveal_cases(live))


def test_aggregator_download_global(live: Live) -> None:
    fuzz(live, "aggregator_download", cases.download_cases(live))


def test_aggregator_watch_round(live: Live) -> None:
    fuzz(live, "aggregator_watch", cases.watch_cases(live))


# --- key manager --------------------------------------------------------------------------


def test_keymanager_enroll(live: Live) -> None:
    fuzz(live, "keymanager_enroll", cases.enroll_cases(live))


def test_keymanager_renew(live: Live) -> None:
    fuzz(live, "keymanager_renew", cases.renew_cases(live))


def test_keymanager_create_token(live: Live) -> None:
    fuzz(live, "keymanager_create_token", cases.create_token_cases(live))


def test_keymanager_revoke(live: Live) -> None:
    fuzz(live, "keymanager_revoke", cases.revoke_cases(live))


def test_keymanager_admin_reads(live: Live) -> None:
    fuzz(live, "keymanager_read", cases.admin_read_cases(live))


def test_keymanager_session_keys(live: Live) -> None:
    fuzz(live, "keymanager_session_keys", cases.session_key_cases(live))


# --- every service ------------------------------------------------------------------------


def test_diagnostics_echo(live: Live) -> None:
    fuzz(live, "diagnostics_echo", cases.echo_cases())


def test_raw_bytes(live: Live) -> None:
    fuzz(live, "raw_bytes", cases.raw_cases(live))


def test_metadata(live: Live) -> None:
    fuzz(live, "metadata", cases.metadata_cases(live))


# --- what the fuzzer found, fixed: each case once, directly ---------------------------------


def test_backbone_caps_the_lora_rank(live: Live) -> None:
    stub = backbone_pb2_grpc.BackboneStub(live.fuzzer.channel("backbone", "fuzz-a"))
    lora = backbone_pb2.LoraConfig(r=(1 << 32) - 1)  # 512 GiB for one matrix of this model
    request = backbone_pb2.OpenSessionRequest(adapter=backbone_pb2.AdapterConfig(lora=lora))
    with pytest.raises(grpc.RpcError) as refused:
        stub.OpenSession(request, timeout=TIMEOUT_S)
    assert refused.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ), refused.value.details()


@pytest.mark.parametrize("setting", ["learning_rate", "weight_decay", "eps"])
def test_backbone_refuses_nan_optimizer_settings(live: Live, setting: str) -> None:
    stub = backbone_pb2_grpc.BackboneStub(live.fuzzer.channel("backbone", "fuzz-a"))
    optimizer = backbone_pb2.OptimizerConfig(**{"learning_rate": 1e-3, setting: math.nan})
    request = backbone_pb2.OpenSessionRequest(optimizer=optimizer)
    with pytest.raises(grpc.RpcError) as refused:
        stub.OpenSession(request, timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()


@pytest.mark.parametrize("target", ["mlp", "lm_head"])
def test_backbone_refuses_odd_lora_targets(live: Live, target: str) -> None:
    stub = backbone_pb2_grpc.BackboneStub(live.fuzzer.channel("backbone", "fuzz-a"))
    lora = backbone_pb2.LoraConfig(r=4, target_modules=[target])
    request = backbone_pb2.OpenSessionRequest(adapter=backbone_pb2.AdapterConfig(lora=lora))
    with pytest.raises(grpc.RpcError) as refused:
        stub.OpenSession(request, timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
