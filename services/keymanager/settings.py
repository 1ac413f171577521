"""Settings of a key manager (the [keymanager] section) and its key-encryption key."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from splitfed.transport import parse_address

DEFAULT_KEK_ENV = "SPLITFED_KEK"
MIN_KEK_BYTES = 16


@dataclass(frozen=True)
class KeyManagerSettings:
    # Directory made by `splitfed keys init`: ca.pem, ca-key.pem, keymanager.db, server/.
    state_dir: Path
    # The key-encryption key (which protects the CA key and the stored session keys):
    # read from this file, or else from the environment variable named by kek_env.
    kek_file: Path | None = None
    kek_env: str = DEFAULT_KEK_ENV
    # Enrollment port: server-authenticated TLS without client certificates; only Enroll.
    enroll_listen: str = "127.0.0.1:0"
    certificate_validity_s: float = 24 * 3600.0
    # Renewal stops this long after a party enrolled (its certificate's lineage began),
    # and no renewed certificate outlives it: then a new enrollment token is needed.
    max_certificate_lifetime_s: float = 30 * 24 * 3600.0
    token_ttl_s: float = 24 * 3600.0
    max_token_ttl_s: float = 7 * 24 * 3600.0
    # How often the key manager checks whether its own certificate needs renewing.
    renew_check_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.kek_file is not None:
            object.__setattr__(self, "kek_file", Path(self.kek_file))
        parse_address(self.enroll_listen)
        if self.certificate_validity_s < 60:
            raise ValueError(
                f"certificate_validity_s must be >= 60, got {self.certificate_validity_s}"
            )
        if self.max_certificate_lifetime_s < self.certificate_validity_s:
            raise ValueError(
                "max_certificate_lifetime_s must be >= certificate_validity_s "
                f"({self.certificate_validity_s}), got {self.max_certificate_lifetime_s}"
            )
        if self.renew_check_s <= 0:
            raise ValueError(f"renew_check_s must be positive, got {self.renew_check_s}")
        if not 0 < self.token_ttl_s <= self.max_token_ttl_s:
            raise ValueError(
                f"token_ttl_s must be in (0, max_token_ttl_s={self.max_token_ttl_s}], "
                f"got {self.token_ttl_s}"
            )

    def kek(self) -> bytes:
        return load_kek(self.kek_file, self.kek_env)


def load_kek(kek_file: Path | None, kek_env: str = DEFAULT_KEK_ENV) -> bytes:
    """The key-encryption key from ``kek_file`` (which only its owner may read or write)
    or the environment; never logged."""
    if kek_file is not None:
        try:
            check_private(kek_file, "key-encryption key file")
            value = kek_file.read_bytes().strip()
        except FileNotFoundError:
            raise ValueError(f"key-encryption key file {kek_file} does not exist") from None
        except OSError as exc:
            raise ValueError(f"cannot read key-encryption key file {kek_file}: {exc}") from None
        where = f"key-encryption key file {kek_file}"
    else:
        value = os.environ.get(kek_env, "").strip().encode()
        where = f"environment variable {kek_env}"
        if not value:
            raise ValueError(
                f"no key-encryption key: set {kek_env} or give kek_file "
                "(make one with `splitfed keys init --kek-file PATH`)"
            )
    if len(value) < MIN_KEK_BYTES:
        raise ValueError(f"the key-encryption key in {where} must be >= {MIN_KEK_BYTES} bytes")
    return value


def check_private(path: Path, what: str) -> None:
    """Refuse ``path`` (symbolic links followed) if its group or others may read or write it."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o066:
        raise ValueError(
            f"{what} {path} may be read or written by group or others (mode {mode:04o}); "
            f"make it private: chmod 600 {path}"
        )
