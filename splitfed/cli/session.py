"""``splitfed demo --write-configs DIR``: everything the README's session needs on one
machine (a tiny model, its data, and the config of every party), so that a reader can run
that session as written.

The parties find each other on ``localhost``; each server's certificate must carry that
name (``keys token create ... --dns localhost``), and each listens on its own port.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitfed.cli.deployment import ADAPTER, BATCH_SIZE, MAX_LENGTH, OPTIMIZER
from splitfed.cli.sample import Sample, write_sample
from splitfed.models.schema import adapter_schema, write_schema

FEDERATION = "hospitals"
HOST = "localhost"


@dataclass(frozen=True)
class Ports:
    """The session's ports on 127.0.0.1 (gRPC, then the Prometheus endpoints)."""

    keymanager: int = 7443
    enroll: int = 7444
    backbone: int = 7450
    aggregator: int = 7460
    keymanager_metrics: int = 9443
    backbone_metrics: int = 9450
    aggregator_metrics: int = 9460


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def write_session(root: Path, ports: Ports = Ports()) -> dict[str, Path]:
    """Write the README session's files under ``root`` (which must be empty or absent);
    returns what was written, by name."""
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; give a new directory")
    sample: Sample = write_sample(root)
    schema = root / f"{FEDERATION}-schema.json"
    write_schema(schema, adapter_schema(sample.model, ADAPTER))
    keymanager = f"{HOST}:{ports.keymanager}"
    files = {
        "keymanager.toml": f"""\
# The key manager: the deployment's CA (made by `splitfed keys init --state-dir km`),
# enrollment and certificate renewal. Its own TLS material: km/server (the default).
[keymanager]
state_dir = "km"
kek_file = "kek"
enroll_listen = "127.0.0.1:{ports.enroll}"

[server]
listen = "127.0.0.1:{ports.keymanager}"
metrics_port = {ports.keymanager_metrics}
""",
        "backbone.toml": f"""\
# The backbone: the shared body of the model. Its certificate (certs/backbone-0) must
# carry the name clients dial: "{HOST}" (`keys token create ... --dns {HOST}`).
[backbone]
model_path = "{sample.model.name}"
state_dir = "backbone-state"
# The aggregator that may average this body's adapters for its federation.
aggregators = ["aggregator-0:{FEDERATION}"]

[server]
listen = "127.0.0.1:{ports.backbone}"
tls_dir = "certs/backbone-0"
metrics_port = {ports.backbone_metrics}

[security]
keymanager = "{keymanager}"
""",
        "aggregator.toml": f"""\
# The aggregator: one federation of data owners (add members, and raise min_clients, for
# more; secure_aggregation needs at least 2).
[aggregator]
state_dir = "aggregator-state"

[[aggregator.federations]]
name = "{FEDERATION}"
members = ["hospital-a"]
min_clients = 1
rounds = 3
local_steps = 30
adapter_seed = {ADAPTER.seed}
# The tensors every update must hold (`splitfed adapters schema --config client.toml`).
schema_file = "{schema.name}"
# The body adapters each member trained on the backbone are averaged too.
server_adapters = true
backbones = ["{HOST}:{ports.backbone}"]

[server]
listen = "127.0.0.1:{ports.aggregator}"
tls_dir = "certs/aggregator-0"
metrics_port = {ports.aggregator_metrics}

[security]
keymanager = "{keymanager}"
""",
        "client.toml": f"""\
# hospital-a, a data owner: the head and tail of the model stay here, with its data.
[backbone]
address = "{HOST}:{ports.backbone}"
tls_dir = "certs/hospital-a"

[training]
model_path = "{sample.model.name}"
data = "{sample.train.name}"
eval_data = "{sample.heldout.name}"
checkpoint_dir = "hospital-a-adapter"
batch_size = {BATCH_SIZE}
max_length = {MAX_LENGTH}
# Activations and gradients sealed with a per-session key from the key manager.
encrypted = true

[adapter]
kind = "{ADAPTER.kind}"
r = {ADAPTER.r}
alpha = {ADAPTER.alpha}
target_modules = {_toml_list(tuple(ADAPTER.target_modules))}
seed = {ADAPTER.seed}

[optimizer]
learning_rate = {OPTIMIZER.learning_rate}
schedule = "{OPTIMIZER.schedule}"

[generation]
max_new_tokens = 16

[federated]
aggregator = "{HOST}:{ports.aggregator}"
federation = "{FEDERATION}"

[security]
keymanager = "{keymanager}"
""",
    }
    written = {"model": sample.model, "train": sample.train, "heldout": sample.heldout}
    written[schema.name] = schema
    for name, text in files.items():
        (root / name).write_text(text)
        written[name] = root / name
    return written
