#!/bin/sh
# Init container of the aggregator and backbone pods: make sure the pod holds a valid
# certificate for its identity (the pod's name) in $SPLITFED_TLS_DIR, on its volume.
# A certificate from an earlier start is kept while it is valid for 10 more minutes and
# comes from the current CA (the running service renews it itself, docs/security.md);
# otherwise the pod enrolls with the one-time token the operator put into the Secret
# splitfed-bootstrap under the pod's name (docs/deploy.md). The private key is
# generated here and never leaves the volume.
set -eu
identity="${SPLITFED_IDENTITY:?}"
tls_dir="${SPLITFED_TLS_DIR:?}"
ca="${SPLITFED_CA:-/etc/splitfed/ca/ca.pem}"
token_file="${SPLITFED_BOOTSTRAP_DIR:-/var/run/splitfed/bootstrap}/$identity"

if python - "$tls_dir" "$ca" <<'PY'
import datetime as dt
import sys
from pathlib import Path

from cryptography import x509

tls_dir, ca = Path(sys.argv[1]), Path(sys.argv[2])
try:
    cert = x509.load_pem_x509_certificate((tls_dir / "cert.pem").read_bytes())
    same_ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes()) == (
        x509.load_pem_x509_certificate(ca.read_bytes())
    )
    has_key = (tls_dir / "key.pem").stat().st_size > 0
except (OSError, ValueError):
    sys.exit(1)
left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
sys.exit(0 if same_ca and has_key and left > dt.timedelta(minutes=10) else 1)
PY
then
    echo "the certificate of $identity in $tls_dir is valid; not enrolling"
    exit 0
fi
if [ ! -s "$token_file" ]; then
    echo "error: no valid certificate in $tls_dir and no bootstrap token for $identity;" \
        "create one and add it to the Secret splitfed-bootstrap under the key $identity" \
        "(docs/deploy.md)" >&2
    exit 1
fi
SPLITFED_TOKEN="$(cat "$token_file")"
export SPLITFED_TOKEN
exec splitfed keys enroll --ca "$ca" --identity "$identity" --out "$tls_dir"
