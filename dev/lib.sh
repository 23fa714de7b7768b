# Shared paths and helpers for the rig scripts. Sourced, never run.
# Everything slow lives in a cache outside the repository; everything a running rig owns lives
# under RIG_DIR so one `dev/rig down` (or the next `dev/rig up`) can clean it exactly.
set -euo pipefail

CLOUDLB_CACHE=${CLOUDLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlb}
RIG_DIR=${RIG_DIR:-${XDG_RUNTIME_DIR:-/tmp}/cloudlb-rig}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
HELM_VERSION=v4.3.1
LOCALSTACK_VERSION=4.14.0
LOCALSTACK_EXCLUDE_NEWER=2026-03-01

BIN_DIR=$CLOUDLB_CACHE/bin
VENV_DIR=$CLOUDLB_CACHE/localstack-venv

# The rig's one private range; nothing outside it (or loopback) is ever addressed.
RIG_NET_PREFIX=10.213
RIG_BRIDGE=clb0
RIG_NS_PREFIX=clb-

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for DESC SECONDS CMD... — poll CMD until it succeeds, at most SECONDS.
wait_for() {
  local desc=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${secs}s waiting for $desc"; return 1; }
    sleep 0.2
  done
}
