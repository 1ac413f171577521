"""Every public function of the SDK that takes a path (splitfed.models, splitfed.clients,
the TLS and config loaders, the certificate writers) accepts a ``str`` as well as a
``Path``: each is called here with plain strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitfed.clients.app import ClientConfig
from splitfed.clients.data import read_examples, read_records
from splitfed.clients.evaluation import load_eval_set, load_tokenizer, local_model, local_models
from splitfed.config import read_config
from splitfed.models.adapters import AdapterSettings, adapter_state, load_adapter, save_adapter
from splitfed.models.export import merge_into_checkpoint, write_peft
from splitfed.models.loading import (
    checkpoint_index,
    load_body,
    load_config,
    load_head,
    load_part,
    load_tail,
    load_trainable_ends,
)
from splitfed.models.schema import adapter_schema, load_schema, write_schema
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.security.ca import CertificateAuthority, write_pem
from splitfed.serving import tls_config
from splitfed.tls import TLSConfig

TEXTS = ["Add 1 and 2.", "The answer is 3."]
LORA = AdapterSettings(r=2, alpha=4.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("str-paths"))


@pytest.fixture(scope="module")
def model(root: str) -> str:
    made = make_tiny_checkpoint(f"{root}/model", TEXTS, layers=3, hidden_size=16)
    assert made == Path(root, "model")
    return f"{root}/model"


def test_model_loading_takes_str(model: str) -> None:
    assert load_config(model).num_hidden_layers == 3
    assert set(checkpoint_index(model).values()) == {Path(model, "model.safetensors")}
    assert load_part(model, "body").source_tensors
    assert load_head(model).source_tensors and load_tail(model).source_tensors
    assert load_body(model).source_tensors
    assert load_trainable_ends(model, LORA)[2]
    assert adapter_schema(model, LORA)
    assert load_tokenizer(model).eos_token_id == 2
    local_model(model)
    assert list(local_models(model, model)) == ["model", "trained-model"]


def test_adapters_schemas_and_exports_take_str(model: str, root: str) -> None:
    head, tail, _ = load_trainable_ends(model, LORA)
    tensors = {
        name: torch.zeros_like(tensor)
        for part in (head, tail)
        for name, tensor in adapter_state(part).items()
    }
    save_adapter(f"{root}/a/adapter.safetensors", tensors)
    assert load_adapter(f"{root}/a/adapter.safetensors").keys() == tensors.keys()
    schema = adapter_schema(model, LORA)
    write_schema(f"{root}/schema.json", schema)
    assert load_schema(f"{root}/schema.json") == schema
    write_peft(f"{root}/peft", tensors, LORA, model)
    merge_into_checkpoint(model, f"{root}/peft", f"{root}/merged")
    assert load_config(f"{root}/merged").num_hidden_layers == 3


def test_data_and_configs_take_str(model: str, root: str) -> None:
    data = Path(root, "train.jsonl")
    data.write_text("".join(json.dumps({"prompt": t, "response": "3"}) + "\n" for t in TEXTS))
    assert len(read_records(str(data))) == len(read_examples(str(data))) == 2
    assert load_eval_set(str(data)).task == "lm"
    config = Path(root, "client.toml")
    config.write_text(
        f'[backbone]\naddress = "127.0.0.1:7443"\n'
        f'[training]\ndata = "{data}"\nmodel_path = "{model}"\n'
    )
    assert read_config(str(config))["training"]["model_path"] == model
    assert ClientConfig.load(str(config)).training.model_path == Path(model)


def test_tls_material_takes_str(root: str) -> None:
    ca = CertificateAuthority.create("test CA")
    issued = ca.issue("hospital-a", "client")
    issued.write(f"{root}/tls")
    write_pem(f"{root}/ca-copy.pem", ca.cert_pem, private=False)
    loaded = TLSConfig.from_dir(f"{root}/tls")
    assert loaded.source_dir == Path(root, "tls")
    files = (f"{root}/tls/ca.pem", f"{root}/tls/cert.pem", f"{root}/tls/key.pem")
    assert TLSConfig.from_files(*files).ca_cert == loaded.ca_cert
    assert tls_config(f"{root}/tls", None, None, None, False).cert_chain == loaded.cert_chain
    assert tls_config(None, *files, False).private_key == loaded.private_key


def test_settings_that_name_paths_take_str(model: str, root: str) -> None:
    from splitfed.clients.app import FederatedSettings
    from splitfed.clients.trainer import TrainSettings
    from splitfed.security.perturbation import PerturbationSettings
    from splitfed.security.releases import PrivacyLedger, load_summary

    train = TrainSettings(
        data=f"{root}/d.jsonl",  # type: ignore[arg-type]
        model_path=model,  # type: ignore[arg-type]
        eval_data=f"{root}/e.jsonl",  # type: ignore[arg-type]
        checkpoint_dir=f"{root}/ckpt",  # type: ignore[arg-type]
    )
    assert train.eval_data == Path(root, "e.jsonl") and train.checkpoint_dir == Path(root, "ckpt")
    federated = FederatedSettings(
        "127.0.0.1:7445",
        "fed",
        record_updates=f"{root}/sent",  # type: ignore[arg-type]
    )
    assert federated.record_updates == Path(root, "sent")
    settings = PerturbationSettings()
    assert PrivacyLedger(settings, directory=f"{root}/ledger").directory == Path(root, "ledger")
    assert load_summary(f"{root}/nothing", settings) == {}
