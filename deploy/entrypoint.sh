#!/bin/sh
# Every pod of deploy/ (code server, run workers, steps): point DVC at the shared remote when the
# secret vas-dvc-remote gives one (the same remote name as `make dvc-remote`), then run the
# command Dagster or Kubernetes gave.
set -e
if [ -n "${DVC_REMOTE_URL:-}" ]; then
    dvc remote add --local --force --default vasremote "$DVC_REMOTE_URL" >/dev/null
fi
exec "$@"
