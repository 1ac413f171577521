"""The keys a key manager's state directory is protected with, stretched from the KEK.

The key-encryption key (KEK) may be a passphrase a person chose. Everything stored in the
state directory is therefore encrypted under keys derived from it with scrypt, a
memory-hard function, so that each guess at the passphrase costs an attacker holding a
backup one scrypt evaluation (default n=2**17, r=8, p=1: 128 MiB and a few tenths of a
second), not one hash:

    master      = scrypt(KEK, salt, n, r, p, 32 bytes)
    ca password = hex(HKDF-SHA256(master, info="splitfed ca key v2"))    PKCS#8 of ca-key.pem
    sealing key = HKDF-SHA256(master, info="splitfed session keys v2")   AES-256-GCM of the
                                                                         stored session keys

The salt (random, 16 bytes) and the parameters are in ``kdf.json`` next to the CA key,
written by ``splitfed keys init`` (0600). A state directory without it predates this
scheme: the CA key's password was the KEK itself and session keys were sealed under
HKDF-SHA256(KEK, info="splitfed session keys v1"); :class:`KeyAuthority` migrates such a
directory when it opens it.

Parameters below the floor (n < 2**15 or r < 8) are refused unless the caller passes the
test-only ``allow_weak_kdf`` (no configuration file or command reaches it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

KDF_FILE = "kdf.json"
SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1
# The weakest parameters a deployment may use (32 MiB per guess).
MIN_SCRYPT_N = 1 << 15
MIN_SCRYPT_R = 8
# scrypt needs 128 * n * r bytes; more than this would not fit a key manager's pod.
MAX_SCRYPT_BYTES = 1 << 30
SALT_BYTES = 16
KEY_BYTES = 32


@dataclass(frozen=True)
class ScryptParams:
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of 2, got {self.n}")
        if self.r < 1 or self.p < 1:
            raise ValueError(f"scrypt r and p must be >= 1, got r={self.r} p={self.p}")
        if 128 * self.n * self.r > MAX_SCRYPT_BYTES:
            raise ValueError(f"scrypt n={self.n} r={self.r} needs more than 1 GiB of memory")

    @property
    def weak(self) -> bool:
        return self.n < MIN_SCRYPT_N or self.r < MIN_SCRYPT_R

    def check(self, where: object, *, allow_weak: bool = False) -> None:
        if self.weak and not allow_weak:
            raise ValueError(
                f"{where}: scrypt parameters n={self.n} r={self.r} are below the floor "
                f"(n >= {MIN_SCRYPT_N}, r >= {MIN_SCRYPT_R}); weaker ones are for tests only"
            )


@dataclass(frozen=True)
class KdfRecord:
    """What ``kdf.json`` holds: the salt and the scrypt parameters."""

    salt: bytes
    params: ScryptParams

    def to_json(self) -> str:
        return json.dumps(
            {
                "kdf": "scrypt",
                "salt": self.salt.hex(),
                "n": self.params.n,
                "r": self.params.r,
                "p": self.params.p,
            },
            indent=2,
        )


@dataclass(frozen=True, repr=False)
class StateKeys:
    """The two keys the state directory is encrypted under."""

    ca_password: bytes
    sealing_key: bytes

    def __repr__(self) -> str:  # never print key material
        return "StateKeys(...)"


def _expand(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)


def derive_keys(kek: bytes, record: KdfRecord) -> StateKeys:
    """Stretch the KEK (the one costly step: derive once, at start-up)."""
    params = record.params
    master = Scrypt(salt=record.salt, length=KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(
        kek
    )
    return StateKeys(
        ca_password=_expand(master, b"splitfed ca key v2").hex().encode(),
        sealing_key=_expand(master, b"splitfed session keys v2"),
    )


def legacy_keys(kek: bytes) -> StateKeys:
    """The keys of a state directory made before ``kdf.json`` (no stretching)."""
    return StateKeys(ca_password=kek, sealing_key=_expand(kek, b"splitfed session keys v1"))


def read_kdf(state_dir: Path) -> KdfRecord | None:
    """The state directory's ``kdf.json``; None if it has none (an older layout)."""
    path = state_dir / KDF_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        if data["kdf"] != "scrypt":
            raise ValueError(f"unknown kdf {data['kdf']!r}")
        salt = bytes.fromhex(data["salt"])
        if len(salt) < SALT_BYTES:
            raise ValueError(f"salt shorter than {SALT_BYTES} bytes")
        return KdfRecord(salt, ScryptParams(int(data["n"]), int(data["r"]), int(data["p"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid key derivation record: {exc}") from None


def write_kdf(state_dir: Path, params: ScryptParams) -> KdfRecord:
    """Create ``kdf.json`` with a fresh salt (0600; refuses to replace an existing one)."""
    record = KdfRecord(secrets.token_bytes(SALT_BYTES), params)
    path = state_dir / KDF_FILE
    # Written whole under a temporary name (mkstemp: 0600), then linked into place: the
    # file appears complete or not at all, and an existing one is never replaced.
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{KDF_FILE}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(record.to_json() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return record
