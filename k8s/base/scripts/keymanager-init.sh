#!/bin/sh
# Init container of the key manager: on the first start only, create the deployment CA
# and the key manager's state on its volume (`splitfed keys init`): the CA key encrypted
# under the KEK ($SPLITFED_KEK, from the Secret splitfed-kek), the database, the key
# manager's own certificate (state/server/) and an admin certificate (admin/) for
# `kubectl exec`.
# The names in the key manager's certificate are fixed here: the in-cluster Service
# names, localhost for the probes, and SPLITFED_KEYMANAGER_EXTRA_DNS (space-separated)
# for clients outside the cluster. Later starts keep the state as it is.
set -eu
state="${SPLITFED_STATE_DIR:?}"
admin="${SPLITFED_ADMIN_DIR:?}"
namespace="${POD_NAMESPACE:?}"
if [ -e "$state/keymanager.db" ]; then
    echo "key manager state in $state exists; nothing to do"
    exit 0
fi
set -- --dns localhost --ip 127.0.0.1 --dns splitfed-keymanager \
    --dns "splitfed-keymanager.$namespace.svc" \
    --dns "splitfed-keymanager.$namespace.svc.cluster.local"
for name in ${SPLITFED_KEYMANAGER_EXTRA_DNS:-}; do
    set -- "$@" --dns "$name"
done
exec splitfed keys init --state-dir "$state" --admin-dir "$admin" "$@"
