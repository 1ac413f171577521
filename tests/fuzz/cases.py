"""Fuzz cases for every RPC of every service, as hypothesis strategies of :class:`Case`.

Each strategy mixes three kinds of input: hostile values in every field (edge numbers,
NaN, long and odd strings), real values from :class:`Live` (a session the caller owns,
the federation's current round) so that the case gets past the first checks, and
structural attacks on chunked tensors (:mod:`fuzz.strategies`).

One module of some 800 lines on purpose: one strategy per RPC of every service, all
built from the same hostile values and the same :class:`Live` deployment; split by
service they would repeat that vocabulary four times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from fuzz import strategies as fs
from fuzz.budget import full_run
from fuzz.deploy import (
    ADMIN,
    AGGREGATOR,
    CHUNK_BYTES,
    FEDERATIONS,
    IDENTITIES,
    MEMBERS,
    OUTSIDER,
    UPDATE_SCHEMA,
)
from fuzz.harness import METHODS, Case, method_path, request_type
from fuzz.live import OWNER, Live
from hypothesis import strategies as st

from splitfed.protocol.backbone import GENERATE_REQUEST, SESSION_METADATA, TRAIN_REQUEST
from splitfed.security.sealing import FrameContext
from splitfed.transport import MESSAGE_HEADROOM_BYTES
from splitfed.v1 import aggregator_pb2, backbone_pb2, diagnostics_pb2, keys_pb2, tensor_pb2
from splitfed.wire import FrameSpec, iter_chunks, iter_frames

S = st.SearchStrategy
FEDERATION_NAMES = [f["name"] for f in FEDERATIONS]
# Identities the fuzzer must not revoke: it needs them for the rest of the run.
PROTECTED = frozenset({*IDENTITIES, "backbone-0", "diagnostics-0", "keymanager", "admin"})


def _identity(preferred: str, others: Sequence[str] = tuple(IDENTITIES)) -> S[str]:
    """Mostly ``preferred``; sometimes anyone else (other roles, other owners)."""
    return fs.mostly(st.just(preferred), st.sampled_from(list(others)), percent=80)


def _random_id() -> S[str]:
    return st.one_of(st.sampled_from(["5eed" * 6, "0" * 24, ""]), fs.texts(300))


# --- backbone ---------------------------------------------------------------------------


def session_ids(live: Live, *, own: bool = True) -> S[str]:
    which = ["foreign", "closed"] + (["plain", "encrypted", "federated"] if own else [])
    return st.one_of(st.sampled_from([live.sessions[w] for w in which]), _random_id())


def session_metadata(live: Live) -> S[tuple[tuple[str, str | bytes], ...]]:
    own = fs.mostly(st.just("plain"), st.sampled_from(["encrypted", "federated"])).map(
        live.session_metadata
    )
    ids = session_ids(live).map(fs.header_value)
    hostile = st.one_of(
        st.just(()),
        ids.map(lambda s: ((SESSION_METADATA, s),)),
        st.tuples(ids, ids).map(
            lambda pair: ((SESSION_METADATA, pair[0]), (SESSION_METADATA, pair[1]))
        ),
        st.binary(max_size=40).map(lambda b: ((SESSION_METADATA + "-bin", b),)),
    )
    return fs.mostly(own, hostile, percent=80)


def _pair(hidden: int, dims: int = 3) -> S[list[int]]:
    return st.tuples(st.integers(1, 4), st.integers(1, 8)).map(
        lambda bt: [bt[0], bt[1], hidden][:dims]
    )


def _backbone_templates(live: Live) -> list[fs.Template]:
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return [
        fs.Template("h1", floats, _pair(live.hidden_size)),
        fs.Template(
            "attention_mask", (torch.int64, torch.int32, torch.bool, torch.float32), _pair(0, 2)
        ),
        fs.Template("grad_h2", floats, _pair(live.hidden_size)),
    ]


@st.composite
def forward_inputs(
    draw: st.DrawFn, live: Live, *, cached: int = 0
) -> tuple[list[tuple[str, torch.Tensor]], str]:
    """h1 and a matching attention mask (plausible; the mask sometimes holds odd values)."""
    batch, tokens = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    h1 = torch.randn(batch, tokens, live.hidden_size, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, cached + tokens, dtype=torch.int64)
    what = f"h1 [{batch}, {tokens}, {live.hidden_size}] + mask"
    if draw(st.booleans()):
        mask[0, 0] = draw(st.sampled_from([0, -1, 2, 2**62]))
        what += f" holding {int(mask[0, 0])}"
    return [("h1", h1), ("attention_mask", mask)], what


@st.composite
def forward_tensors(
    draw: st.DrawFn, live: Live, *, cached: int = 0
) -> tuple[list[tensor_pb2.TensorChunk], str]:
    """:func:`forward_inputs` chunked, sometimes mutated."""
    tensors, what = draw(forward_inputs(live, cached=cached))
    chunk_bytes = draw(st.sampled_from([64, 1024, 65536]))
    chunks = [c for name, t in tensors for c in iter_chunks(t, name, chunk_bytes=chunk_bytes)]
    if draw(st.integers(0, 2)) == 0:
        chunks, changes = draw(fs.mutate(chunks))
        what += " [" + "; ".join(changes) + "]"
    return chunks, what


def _steps(live: Live) -> S[int]:
    """Mostly the step the owner's plain session expects next; else any."""
    return fs.mostly(st.builds(live.next_step), st.integers(0, 3), fs.unsigned(64), percent=70)


@st.composite
def sealed_frames(
    draw: st.DrawFn,
    live: Live,
    spec: FrameSpec[Any],
    tensors: list[tuple[str, torch.Tensor]],
    **fields: int,
) -> tuple[list[bytes], str]:
    """Frames of ``tensors`` sealed under the encrypted session's key (so that they pass
    the seal), then sometimes dropped, reordered, replayed or altered (so that they must
    not)."""
    outgoing = []
    for name, tensor in tensors:
        for frame in iter_frames(tensor, name, spec, chunk_bytes=draw(st.sampled_from([64, 4096]))):
            for key, value in fields.items():
                setattr(frame.message, key, value)
            outgoing.append(frame)
    context = FrameContext(**{k: fields.get(k, 0) for k in ("op", "step", "micro_batch")})
    sealed = live.seal(outgoing, spec, context)
    if sealed is None:
        return [], "sealing impossible (the session's keys were ended)"
    what = "sealed " + "+".join(name for name, _ in tensors)
    how = draw(st.sampled_from(["none", "none", "drop", "swap", "replay", "flip", "fields"]))
    at = draw(st.integers(0, max(0, len(sealed) - 1)))
    if how == "drop" and sealed:
        del sealed[at]
    elif how == "swap" and len(sealed) > 1:
        sealed[0], sealed[at] = sealed[at], sealed[0]
    elif how == "replay":
        sealed.insert(at, live.last_sealed or sealed[at])
    elif how == "flip" and sealed:
        data = bytearray(sealed[at])
        data[draw(st.integers(0, len(data) - 1))] ^= 0x40
        sealed[at] = bytes(data)
    elif how == "fields" and sealed:
        message = spec.message_type.FromString(sealed[at])
        for key in fields:
            setattr(message, key, draw(st.integers(0, 3)))
        sealed[at] = message.SerializeToString()
    if sealed:
        live.last_sealed = sealed[-1]
    return sealed, f"{what} [{how}]" if how != "none" else what


def _chunk_frames(
    chunks: Sequence[tensor_pb2.TensorChunk], make: type, **fields: int
) -> list[bytes]:
    return [make(chunk=c, **fields).SerializeToString() for c in chunks]


def _sealed_train(draw: st.DrawFn, live: Live) -> tuple[list[bytes], list[str]]:
    """Training frames sealed for the owner's encrypted session, some then tampered with."""
    messages: list[bytes] = []
    notes = []
    step = draw(fs.mostly(st.builds(live.next_step, st.just("encrypted")), st.integers(0, 3)))
    for micro in range(draw(st.integers(1, 2))):
        tensors, what = draw(forward_inputs(live))
        op = draw(st.sampled_from([backbone_pb2.TRAIN_OP_FORWARD, backbone_pb2.TRAIN_OP_EVAL]))
        fields = {"op": op, "step": step, "micro_batch": micro}
        frames, sealed = draw(sealed_frames(live, TRAIN_REQUEST, tensors, **fields))
        messages += frames
        notes.append(f"{backbone_pb2.TrainOp.Name(op)} step {step}: {what}, {sealed}")
        if op == backbone_pb2.TRAIN_OP_FORWARD and draw(st.booleans()):
            grad = torch.ones_like(tensors[0][1])
            fields["op"] = backbone_pb2.TRAIN_OP_BACKWARD
            frames, sealed = draw(sealed_frames(live, TRAIN_REQUEST, [("grad_h2", grad)], **fields))
            messages += frames
            notes.append(f"BACKWARD {sealed}")
    if draw(st.booleans()):
        command = backbone_pb2.StepCommand(client_grad_sq_norm=1.0, max_grad_norm=1.0)
        step_frame = backbone_pb2.TrainRequest(
            op=backbone_pb2.TRAIN_OP_STEP, step=step, command=command
        )
        messages.append(step_frame.SerializeToString())
        notes.append("STEP")
    return messages, notes


@st.composite
def train_cases(draw: st.DrawFn, live: Live) -> Case:
    if draw(st.integers(0, 4)) == 0:
        messages, notes = _sealed_train(draw, live)
        return Case(
            "backbone",
            method_path("Backbone", "Train"),
            OWNER,
            tuple(messages),
            live.session_metadata("encrypted"),
            cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=80)),
            what="; ".join(notes),
        )
    templates = _backbone_templates(live)
    messages = []
    notes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["forward", "forward", "roundtrip", "roundtrip", "tensors", "control", "raw"]
            )
        )
        step, micro = draw(_steps(live)), draw(st.one_of(st.integers(0, 2), fs.unsigned(32)))
        if kind in ("forward", "tensors"):
            op = draw(
                st.sampled_from(
                    [
                        backbone_pb2.TRAIN_OP_FORWARD,
                        backbone_pb2.TRAIN_OP_FORWARD,
                        backbone_pb2.TRAIN_OP_EVAL,
                        backbone_pb2.TRAIN_OP_BACKWARD,
                    ]
                )
            )
            chunks, what = draw(
                forward_tensors(live) if kind == "forward" else fs.tensor_stream(templates)
            )
            messages += _chunk_frames(
                chunks, backbone_pb2.TrainRequest, op=op, step=step, micro_batch=micro
            )
            notes.append(f"{backbone_pb2.TrainOp.Name(op)} step {step}: {what}")
        elif kind == "roundtrip":
            # forward, backward with a gradient of h2's shape, step: a real training step.
            chunks, what = draw(forward_tensors(live))
            fields = {"step": step, "micro_batch": micro}
            messages += _chunk_frames(
                chunks, backbone_pb2.TrainRequest, op=backbone_pb2.TRAIN_OP_FORWARD, **fields
            )
            grad_chunks, grad_what = draw(fs.tensor_stream([templates[2]], max_tensors=1))
            messages += _chunk_frames(
                grad_chunks, backbone_pb2.TrainRequest, op=backbone_pb2.TRAIN_OP_BACKWARD, **fields
            )
            command = backbone_pb2.StepCommand(
                client_grad_sq_norm=draw(fs.doubles), max_grad_norm=draw(fs.doubles)
            )
            messages.append(
                backbone_pb2.TrainRequest(
                    op=backbone_pb2.TRAIN_OP_STEP, step=step, command=command
                ).SerializeToString()
            )
            notes.append(f"step {step}: forward {what}, backward {grad_what}, STEP {command}")
        elif kind == "control":
            op = draw(
                st.one_of(st.sampled_from(list(backbone_pb2.TrainOp.values())), fs.signed(32))
            )
            command = backbone_pb2.StepCommand(
                client_grad_sq_norm=draw(fs.doubles), max_grad_norm=draw(fs.doubles)
            )
            messages.append(
                backbone_pb2.TrainRequest(
                    op=op, step=step, micro_batch=micro, command=command
                ).SerializeToString()  # type: ignore[arg-type]
            )
            notes.append(f"op {op} step {step}")
        else:
            valid = fs.messages(backbone_pb2.TrainRequest.DESCRIPTOR).map(
                lambda m: m.SerializeToString()
            )
            messages.append(draw(fs.raw_messages(valid)))
            notes.append("raw bytes")
    return Case(
        "backbone",
        method_path("Backbone", "Train"),
        draw(_identity(OWNER)),
        tuple(messages),
        draw(session_metadata(live)),
        cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=70)),
        what="; ".join(notes),
    )


@st.composite
def generate_cases(draw: st.DrawFn, live: Live) -> Case:
    templates = _backbone_templates(live)
    messages: list[bytes] = []
    notes = []
    sealed_session = False
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["forward", "forward", "tensors", "reset", "trim", "other", "sealed"])
        )
        if kind == "sealed":
            # Sealed for the encrypted session: sent there, it passes the seal; sent to
            # another session, the seal must be refused.
            sealed_session = True
            tensors, what = draw(forward_inputs(live, cached=draw(st.integers(0, 8))))
            frames, how = draw(
                sealed_frames(live, GENERATE_REQUEST, tensors, op=backbone_pb2.GENERATE_OP_FORWARD)
            )
            messages += frames
            notes.append(f"FORWARD {what}, {how}")
        elif kind in ("forward", "tensors"):
            chunks, what = draw(
                forward_tensors(live, cached=draw(st.integers(0, 8)))
                if kind == "forward"
                else fs.tensor_stream(templates)
            )
            messages += _chunk_frames(
                chunks, backbone_pb2.GenerateRequest, op=backbone_pb2.GENERATE_OP_FORWARD
            )
            notes.append(f"FORWARD {what}")
        elif kind == "reset":
            messages.append(
                backbone_pb2.GenerateRequest(op=backbone_pb2.GENERATE_OP_RESET).SerializeToString()
            )
            notes.append("RESET")
        elif kind == "trim":
            length = draw(st.one_of(st.integers(0, 20), fs.unsigned(64)))
            messages.append(
                backbone_pb2.GenerateRequest(
                    op=backbone_pb2.GENERATE_OP_TRIM, length=length
                ).SerializeToString()
            )
            notes.append(f"TRIM {length}")
        else:
            message = draw(fs.messages(backbone_pb2.GenerateRequest.DESCRIPTOR))
            messages.append(message.SerializeToString())
            notes.append("any fields")
    return Case(
        "backbone",
        method_path("Backbone", "Generate"),
        draw(_identity(OWNER)),
        tuple(messages),
        draw(
            fs.mostly(st.just(live.session_metadata("encrypted")), session_metadata(live))
            if sealed_session
            else session_metadata(live)
        ),
        cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=70)),
        what="; ".join(notes),
    )


@st.composite
def import_cases(draw: st.DrawFn, live: Live) -> Case:
    templates = [
        fs.Template(
            name, (dtype, torch.float16, torch.float64), st.one_of(st.just(shape), fs.any_shape(3))
        )
        for name, (shape, dtype) in live.adapter.items()
    ]
    chunks, what = draw(fs.tensor_stream(templates, max_tensors=4))
    messages = _chunk_frames(chunks, backbone_pb2.ImportAdapterRequest)
    return Case(
        "backbone",
        method_path("Backbone", "ImportAdapter"),
        draw(_identity(OWNER, [AGGREGATOR, OUTSIDER, MEMBERS[1]])),
        tuple(messages),
        draw(session_metadata(live)),
        cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=70)),
        what=what,
    )


def export_cases(live: Live) -> S[Case]:
    request = fs.messages(
        backbone_pb2.ExportAdapterRequest.DESCRIPTOR, {"session_id": session_ids(live)}
    )
    return st.builds(
        lambda identity, message: Case(
            "backbone",
            method_path("Backbone", "ExportAdapter"),
            identity,
            (message.SerializeToString(),),
        ),
        _identity(OWNER, [AGGREGATOR, OUTSIDER, MEMBERS[1], ADMIN]),
        request,
    )


def open_cases(live: Live) -> S[Case]:
    hints = {
        "model_id": st.just(live.model_id),
        "k": st.integers(0, 4),
        "m": st.integers(0, 4),
        "r": st.integers(0, 64),
        "length": st.integers(0, 64),
        "encoding": st.sampled_from(["raw", "bf16", "int8"]),
        "session_id": session_ids(live),
        "federation": st.sampled_from(FEDERATION_NAMES),
        "target_modules": st.lists(
            st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "mlp"])
        ),
        "schedule": st.sampled_from(["constant", "linear", "cosine"]),
    }
    return st.builds(
        lambda identity, message: Case(
            "backbone",
            method_path("Backbone", "OpenSession"),
            identity,
            (message.SerializeToString(),),
        ),
        _identity(OWNER),
        st.one_of(
            plausible_open(live), fs.messages(backbone_pb2.OpenSessionRequest.DESCRIPTOR, hints)
        ),
    )


@st.composite
def plausible_open(draw: st.DrawFn, live: Live) -> backbone_pb2.OpenSessionRequest:
    """A new session as a client asks for one, with one or two settings at an extreme:
    LoRA ranks and prefix lengths up to 2**32 - 1, NaN and infinite hyper-parameters.
    (`make test`'s sample stays below ranks of 2**17, which cost seconds and GiBs.)"""
    huge = [1024, 1025, 4097]
    if full_run():
        huge += [1 << 17, 1 << 20, (1 << 31) - 1, (1 << 32) - 1]
    odd_values: dict[str, S[Any]] = {
        "r": st.sampled_from([0, *huge]),
        "length": st.sampled_from([0, *huge]),
        "alpha": fs.singles,
        "dropout": fs.singles,
        "target_modules": st.lists(st.sampled_from(["q_proj", "mlp", "lm_head", ""]), min_size=1),
        "learning_rate": fs.doubles,
        "weight_decay": fs.doubles,
        "eps": fs.doubles,
        "warmup_steps": fs.unsigned(32),
        "total_steps": fs.unsigned(32),
        "schedule": st.sampled_from(["linear", "cosine", "?"]),
        "k": st.one_of(st.integers(1, 4), fs.unsigned(32)),
        "m": st.one_of(st.integers(1, 4), fs.unsigned(32)),
        "encoding": st.sampled_from(["bf16", "int8", "zstd"]),
        "federation": st.sampled_from(FEDERATION_NAMES),
    }
    # Sizes weigh more: they decide what a session costs the backbone.
    names = [*sorted(odd_values), "r", "r", "length"]
    odd = set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=2)))

    def value(name: str, usual: Any) -> Any:
        return draw(odd_values[name]) if name in odd else usual

    adapter = backbone_pb2.AdapterConfig(seed=draw(fs.unsigned(64)))
    if draw(st.integers(0, 3)):
        adapter.lora.r = value("r", draw(st.integers(1, 16)))
        adapter.lora.alpha = value("alpha", 8.0)
        adapter.lora.dropout = value("dropout", 0.0)
        adapter.lora.target_modules.extend(value("target_modules", []))
    else:
        adapter.prefix.length = value("length", draw(st.integers(1, 32)))
    optimizer = backbone_pb2.OptimizerConfig(
        learning_rate=value("learning_rate", 1e-3),
        weight_decay=value("weight_decay", 0.0),
        eps=value("eps", 0.0),
        warmup_steps=value("warmup_steps", 0),
        total_steps=value("total_steps", 0),
        schedule=value("schedule", ""),
    )
    return backbone_pb2.OpenSessionRequest(
        model_id=live.model_id,
        k=value("k", 0),
        m=value("m", 0),
        adapter=adapter,
        optimizer=optimizer,
        encoding=value("encoding", ""),
        federation=value("federation", ""),
    )


def close_cases(live: Live) -> S[Case]:
    # The owner's own live sessions are not closed here (the other cases need them);
    # OpenSession cases close what they opened, which covers the owner's close.
    request = fs.messages(
        backbone_pb2.CloseSessionRequest.DESCRIPTOR, {"session_id": session_ids(live, own=False)}
    )
    return st.builds(
        lambda identity, message: Case(
            "backbone",
            method_path("Backbone", "CloseSession"),
            identity,
            (message.SerializeToString(),),
        ),
        _identity(OWNER),
        request,
    )


# --- aggregator ---------------------------------------------------------------------------


def _federations() -> S[str]:
    return st.sampled_from(FEDERATION_NAMES)


def _round_hints(live: Live) -> dict[str, S[object]]:
    def current(field: str) -> S[object]:
        return _federations().map(lambda name: getattr(live.plan(name), field))

    return {
        "federation": _federations(),
        "round": current("round"),
        "attempt": current("attempt"),
        "base_version": current("global_version"),
        "version": st.one_of(st.integers(0, 3), current("global_version")),
    }


def _unary_aggregator(live: Live, name: str, hints: dict[str, S[object]] | None = None) -> S[Case]:
    path = method_path("Aggregator", name)
    return st.builds(
        lambda identity, message: Case(
            "aggregator",
            path,
            identity,
            (message.SerializeToString(),),
            max_responses=1 if name == "WatchRound" else None,
        ),
        _identity(OWNER, [*MEMBERS, OUTSIDER, ADMIN, AGGREGATOR]),
        fs.messages(request_type(path).DESCRIPTOR, {**_round_hints(live), **(hints or {})}),
    )


def join_cases(live: Live) -> S[Case]:
    return _unary_aggregator(live, "Join")


def plan_cases(live: Live) -> S[Case]:
    return _unary_aggregator(live, "GetRoundPlan")


def advertise_cases(live: Live) -> S[Case]:
    return _unary_aggregator(
        live, "AdvertiseKey", {"public_key": st.binary(min_size=32, max_size=32)}
    )


def reveal_cases(live: Live) -> S[Case]:
    seeds = st.dictionaries(
        st.sampled_from([*MEMBERS, OUTSIDER]), st.binary(min_size=32, max_size=32), max_size=3
    )
    return _unary_aggregator(live, "RevealSeeds", {"seeds": seeds})


def download_cases(live: Live) -> S[Case]:
    return _unary_aggregator(live, "DownloadGlobal")


def watch_cases(live: Live) -> S[Case]:
    return _unary_aggregator(live, "WatchRound")


# The update every member uploads when it plays along (names and shapes).
@st.composite
def update_tensors(draw: st.DrawFn, dtype: torch.dtype) -> tuple[list[tensor_pb2.TensorChunk], str]:
    """An update of the common schema (values may be NaN, huge, or the schema may hold
    a reserved name), sometimes mutated."""
    schema = list(UPDATE_SCHEMA)
    if draw(st.integers(0, 9)) == 0:
        schema.append((draw(st.sampled_from(["__metadata__", "", "x" * 300])), [1]))
    kind = draw(st.sampled_from(["normal", "normal", "normal", "special"]))
    chunks: list[tensor_pb2.TensorChunk] = []
    for name, shape in schema:
        tensor = fs.tensor_values(dtype, shape, draw(st.integers(0, 2**16)), kind)
        chunks += iter_chunks(tensor, name, chunk_bytes=draw(st.sampled_from([8, 4096])))
    what = f"update {[n[:20] for n, _ in schema]} {kind}"
    if draw(st.integers(0, 3)) == 0:
        chunks, changes = draw(fs.mutate(chunks))
        what += " [" + "; ".join(changes) + "]"
    return chunks, what


@st.composite
def upload_cases(draw: st.DrawFn, live: Live) -> Case:
    federation = draw(_federations())
    plan = live.plan(federation)
    head = draw(
        fs.messages(
            aggregator_pb2.UploadUpdateRequest.DESCRIPTOR,
            {
                "federation": st.just(federation),
                "round": st.just(plan.round),
                "attempt": st.just(plan.attempt),
                "base_version": st.just(plan.global_version),
                "num_samples": st.integers(1, 100),
                "backbone": st.just(live.deployment.hosts["backbone"].address),
                "backbone_session": session_ids(live),
            },
            depth=0,
        )
    )
    dtype = torch.int64 if plan.secure_aggregation else torch.float32
    if draw(st.booleans()):
        # The members' common schema: uploads count, rounds close, versions are made.
        chunks, what = draw(update_tensors(dtype))
    else:
        templates = [
            fs.Template(name, (dtype,), st.lists(st.integers(1, 8), min_size=2, max_size=2))
            for name, _ in UPDATE_SCHEMA
        ]
        chunks, what = draw(fs.tensor_stream(templates, max_tensors=4))
    messages = []
    for index, chunk in enumerate(chunks):
        message = aggregator_pb2.UploadUpdateRequest()
        if index == 0 or draw(st.integers(0, 9)) == 0:  # the head again: hostile
            message.CopyFrom(head)
        message.chunk.CopyFrom(chunk)
        messages.append(message.SerializeToString())
    if not messages or draw(st.integers(0, 9)) == 0:
        messages.insert(0, head.SerializeToString())  # a head without a chunk
    return Case(
        "aggregator",
        method_path("Aggregator", "UploadUpdate"),
        draw(_identity(draw(st.sampled_from(MEMBERS)), [OUTSIDER, ADMIN])),
        tuple(messages),
        cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=70)),
        what=f"{federation} round {plan.round}: {what}",
    )


# --- key manager ----------------------------------------------------------------------------


def _pem(live: Live) -> S[bytes]:
    csrs = list(live.csrs.values())
    return st.one_of(st.sampled_from(csrs), st.sampled_from(csrs).flatmap(fs.mangled))


def _unary_keymanager(
    live: Live, name: str, identities: S[str], hints: dict[str, S[object]] | None = None
) -> S[Case]:
    path = method_path("KeyManager", name)
    return st.builds(
        lambda identity, message: Case(
            "keymanager",
            path,
            identity,
            (message.SerializeToString(),),
            port="enroll" if name == "Enroll" else "main",
        ),
        identities,
        fs.messages(request_type(path).DESCRIPTOR, hints),
    )


def enroll_cases(live: Live) -> S[Case]:
    hints = {"token": st.sampled_from(live.tokens), "csr_pem": _pem(live)}
    return _unary_keymanager(live, "Enroll", st.just(""), hints)


def renew_cases(live: Live) -> S[Case]:
    def for_identity(identity: str) -> S[Case]:
        own = st.just(live.csrs[identity])
        csr = fs.mostly(own, own.flatmap(fs.mangled), _pem(live), percent=60)
        return _unary_keymanager(live, "Renew", st.just(identity), {"csr_pem": csr})

    return st.sampled_from(list(IDENTITIES)).flatmap(for_identity)


def _encrypted(live: Live) -> S[str]:
    return st.one_of(st.just(live.sessions["encrypted"]), _random_id())


def create_token_cases(live: Live) -> S[Case]:
    hints = {
        "identity": st.sampled_from(["enrollee-9", "fuzz-new", "Bad Name", "a" * 64]),
        "role": st.sampled_from(["client", "backbone", "aggregator", "admin", "keymanager"]),
        "ttl_s": st.integers(0, 10**6),
        "dns_names": st.lists(st.sampled_from(["localhost", "a..b", "*", "x" * 300]), max_size=3),
        "ip_addresses": st.lists(
            st.sampled_from(["127.0.0.1", "::1", "999.1.1.1", ""]), max_size=3
        ),
    }
    return _unary_keymanager(live, "CreateToken", _identity(ADMIN), hints)


def revoke_cases(live: Live) -> S[Case]:
    hints = {
        "identity": st.sampled_from(["nobody", "enrollee-9", ""]),
        "serial": st.one_of(st.just(""), st.binary(min_size=16, max_size=16).map(bytes.hex)),
    }

    def spare(case: Case) -> Case:
        request = keys_pb2.RevokeRequest.FromString(case.messages[0])
        if request.identity in PROTECTED:
            request.identity = "nobody"
        return Case(case.host, case.method, case.identity, (request.SerializeToString(),))

    return _unary_keymanager(live, "Revoke", _identity(ADMIN), hints).map(spare)


def admin_read_cases(live: Live) -> S[Case]:
    return st.one_of(
        _unary_keymanager(live, "ListCertificates", _identity(ADMIN)),
        _unary_keymanager(live, "GetRevocations", st.sampled_from(list(IDENTITIES))),
    )


def session_key_cases(live: Live) -> S[Case]:
    identities = _identity(OWNER, ["backbone-fuzz", OUTSIDER, MEMBERS[1], ADMIN])
    hints = {
        "session_id": _encrypted(live),
        "owner": st.sampled_from([f"client/{OWNER}", OWNER, ""]),
        "key_id": st.integers(0, 3),
    }
    return st.one_of(
        _unary_keymanager(live, "RegisterSession", _identity("backbone-fuzz"), hints),
        _unary_keymanager(live, "GetSessionKey", identities, hints),
        _unary_keymanager(live, "RotateSessionKey", identities, hints),
        _unary_keymanager(live, "EndSession", identities, hints),
    )


# --- diagnostics, raw bytes, metadata -----------------------------------------------------


@st.composite
def echo_cases(draw: st.DrawFn) -> Case:
    host = draw(st.sampled_from(["diagnostics", "diagnostics", "backbone", "aggregator"]))
    chunks, what = draw(fs.tensor_stream())
    messages = _chunk_frames(chunks, diagnostics_pb2.EchoTensorsRequest)
    if draw(st.integers(0, 5)) == 0:
        valid = st.just(messages[0] if messages else b"")
        messages.insert(draw(st.integers(0, len(messages))), draw(fs.raw_messages(valid)))
        what += " + raw bytes"
    return Case(
        host,
        method_path("Diagnostics", "EchoTensors"),
        draw(st.sampled_from(list(IDENTITIES))),
        tuple(messages),
        cancel_after=draw(fs.mostly(st.none(), st.integers(0, len(messages)), percent=70)),
        what=f"to {host}: {what}",
    )


_HOSTS = {
    "Backbone": ["backbone"],
    "Aggregator": ["aggregator"],
    "KeyManager": ["keymanager"],
    "Diagnostics": ["diagnostics", "backbone", "aggregator"],
}
# Methods whose successful calls never end by themselves.
_ENDLESS = frozenset({method_path("Aggregator", "WatchRound")})


def _any_method() -> S[str]:
    return st.sampled_from(sorted(METHODS))


@st.composite
def raw_cases(draw: st.DrawFn, live: Live) -> Case:
    """Random and mangled bytes as the request messages of any method."""
    path = draw(_any_method())
    method = METHODS[path]
    service = method.containing_service.name
    valid = fs.messages(method.input_type).map(lambda m: m.SerializeToString())
    count = draw(st.integers(1, 4)) if method.client_streaming else 1
    messages = [draw(fs.raw_messages(valid)) for _ in range(count)]
    if draw(st.integers(0, 9)) == 0:
        # Over the services' message limit (a chunk plus headroom): refused by gRPC.
        limit = CHUNK_BYTES + MESSAGE_HEADROOM_BYTES
        messages[-1] = b"\x0a" * (limit + draw(st.integers(1, 64 * 1024)))
    enroll = path == method_path("KeyManager", "Enroll") and draw(st.booleans())
    return Case(
        draw(st.sampled_from(_HOSTS[service])),
        path,
        "" if enroll else draw(st.sampled_from(list(IDENTITIES))),
        tuple(messages),
        draw(st.one_of(st.just(()), session_metadata(live))),
        max_responses=1 if path in _ENDLESS else None,
        what="raw bytes",
        port="enroll" if enroll else "main",
    )


@st.composite
def metadata_cases(draw: st.DrawFn, live: Live) -> Case:
    """Many and long metadata entries on otherwise plausible calls of any method."""
    path = draw(_any_method())
    method = METHODS[path]
    service = method.containing_service.name
    message = draw(fs.messages(method.input_type, depth=1))
    entries = draw(fs.metadata())
    if service == "Backbone" and draw(st.booleans()):
        entries = live.session_metadata("plain") + entries
    return Case(
        draw(st.sampled_from(_HOSTS[service])),
        path,
        draw(st.sampled_from(list(IDENTITIES))),
        (message.SerializeToString(),),
        entries,
        max_responses=1 if path in _ENDLESS else None,
        what=f"{len(entries)} metadata entries",
        port="main",
    )
