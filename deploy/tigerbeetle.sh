#!/bin/sh
# One TigerBeetle replica's lifecycle, run inside ghcr.io/tigerbeetle/tigerbeetle (Alpine: busybox
# sh, nc). docker-compose.yml and deploy/host-tigerbeetle.yml mount it read-only at /deploy.
#
#   tigerbeetle.sh start          start replica $TB_REPLICA; refuses when its data file is missing
#   tigerbeetle.sh bootstrap N..  format replicas N.. of a brand-new cluster (first deployment only)
#   tigerbeetle.sh recover        rebuild replica $TB_REPLICA's lost data file from the live cluster
#   tigerbeetle.sh health         exit 0 when replica $TB_REPLICA accepts TCP connections
#
# Why start never formats: TigerBeetle's recovery docs forbid `format` for a replica that lost its
# data file. A fresh file forgets the operations that replica acknowledged, so it may nack them
# in a view change and the cluster can lose committed transfers. `recover` is the safe rebuild.
#
# Environment: TB_CLUSTER_ID (decimal u128, not 0; or TB_CLUSTER_ID_FILE, a file holding it, which
# wins: docker-compose.yml's compose secret tb-cluster-id), TB_ADDRESSES (every replica's IP:port, the
# same order everywhere; the replica count is their number), TB_REPLICA (this replica's index),
# TB_CACHE_GRID (start), TB_DATA_ROOT (default /data: replica N's volume at /data/N),
# TB_BINARY (default /tigerbeetle).
set -eu

TB_BINARY="${TB_BINARY:-/tigerbeetle}"
TB_DATA_ROOT="${TB_DATA_ROOT:-/data}"
MARKER=".bootstrapped"
REPLICA_COUNT_MAX=6
U128_DIGITS_MAX=39

fail() {
    echo "tigerbeetle.sh: $*" >&2
    exit 1
}

check_cluster_id() {
    if [ -n "${TB_CLUSTER_ID_FILE:-}" ]; then
        file="$TB_CLUSTER_ID_FILE"
        [ -f "$file" ] || fail "TB_CLUSTER_ID_FILE $file is missing or not a file (deploy/make-secrets.sh)"
        [ "$(wc -c <"$file")" -le 64 ] || fail "TB_CLUSTER_ID_FILE $file: more than 64 bytes"
        TB_CLUSTER_ID=$(tr -d ' \t\r\n' <"$file")
        [ -n "$TB_CLUSTER_ID" ] || fail "TB_CLUSTER_ID_FILE $file is empty (deploy/make-secrets.sh)"
    fi
    id="${TB_CLUSTER_ID:-}"
    case "$id" in
        '' | *[!0-9]*) fail "TB_CLUSTER_ID must be a decimal 128-bit number, got '$id'" ;;
    esac
    [ "${#id}" -le "$U128_DIGITS_MAX" ] || fail "TB_CLUSTER_ID has more than $U128_DIGITS_MAX digits"
    case "$id" in
        *[!0]*) ;;
        *) fail "TB_CLUSTER_ID 0 is reserved for testing; use a random 128-bit number" ;;
    esac
}

replica_count() {
    [ -n "${TB_ADDRESSES:-}" ] || fail "TB_ADDRESSES is required"
    count=$(printf '%s\n' "$TB_ADDRESSES" | tr ',' '\n' | grep -c .)
    [ "$count" -ge 1 ] && [ "$count" -le "$REPLICA_COUNT_MAX" ] ||
        fail "TB_ADDRESSES lists $count replicas (1..$REPLICA_COUNT_MAX)"
    echo "$count"
}

check_replica() {
    replica="$1"
    case "$replica" in
        '' | *[!0-9]*) fail "replica index must be a number, got '$replica'" ;;
    esac
    [ "$replica" -lt "$(replica_count)" ] || fail "replica $replica is not in TB_ADDRESSES"
}

data_file() {
    echo "$TB_DATA_ROOT/$1/${TB_CLUSTER_ID}_$1.tigerbeetle"
}

refuse_missing() {
    replica="$1"
    file="$2"
    cat >&2 <<EOF
tigerbeetle.sh: replica $replica: data file $file is missing; refusing to start.
  * First deployment of the cluster: format every replica once, then start again:
      docker compose --profile bootstrap run --rm tigerbeetle-bootstrap
  * This replica lost its data file: do NOT format it (it would forget operations it
    acknowledged and the cluster could lose committed transfers). With the other replicas
    healthy, rebuild it from them (tigerbeetle recover), then start it again:
      docker compose stop tigerbeetle-$replica
      docker compose run --rm tigerbeetle-$replica recover
    (one replica per machine: the service is \`tigerbeetle\` of deploy/host-tigerbeetle.yml)
  * TB_CLUSTER_ID changed since the files were formatted (the id is in the file name and in
    the file): set it back; a cluster's id never changes.
See deploy/MULTI_HOST.md, "Replacing a TigerBeetle replica".
EOF
    exit 1
}

cmd_start() {
    check_cluster_id
    replica="${TB_REPLICA:?TB_REPLICA is required}"
    check_replica "$replica"
    file=$(data_file "$replica")
    [ -f "$file" ] || refuse_missing "$replica" "$file"
    # exec: the init process (compose `init: true`) forwards SIGTERM straight to TigerBeetle.
    exec "$TB_BINARY" start --addresses="$TB_ADDRESSES" \
        --cache-grid="${TB_CACHE_GRID:?TB_CACHE_GRID is required}" "$file"
}

cmd_bootstrap() {
    check_cluster_id
    count=$(replica_count)
    [ "$#" -ge 1 ] || fail "bootstrap: name the replicas to format (e.g. 0 1 2)"
    # All or nothing: every named replica must be brand new before anything is formatted.
    for replica in "$@"; do
        check_replica "$replica"
        dir="$TB_DATA_ROOT/$replica"
        [ -d "$dir" ] || fail "bootstrap: replica $replica's volume is not mounted at $dir"
        if [ -e "$(data_file "$replica")" ] || [ -e "$dir/$MARKER" ]; then
            fail "bootstrap: replica $replica was already bootstrapped ($dir); bootstrap only" \
                "formats a brand-new cluster. A replica that lost its data file is rebuilt with" \
                "'recover', never formatted (deploy/MULTI_HOST.md)."
        fi
        # lost+found: a data directory may be the root of its own file system.
        if [ -n "$(ls -A "$dir" | grep -vx 'lost+found' || true)" ]; then
            fail "bootstrap: $dir is not empty; refusing to format next to unknown files"
        fi
    done
    for replica in "$@"; do
        file=$(data_file "$replica")
        # Format under a temporary name: an interrupted format never leaves a startable file.
        "$TB_BINARY" format --cluster="$TB_CLUSTER_ID" --replica="$replica" \
            --replica-count="$count" "$file.formatting"
        mv "$file.formatting" "$file"
        date -u +%Y-%m-%dT%H:%M:%SZ >"$TB_DATA_ROOT/$replica/$MARKER"
        echo "tigerbeetle.sh: formatted replica $replica of $count: $file"
    done
}

cmd_recover() {
    check_cluster_id
    count=$(replica_count)
    replica="${TB_REPLICA:?TB_REPLICA is required}"
    check_replica "$replica"
    file=$(data_file "$replica")
    [ ! -e "$file" ] || fail "recover: $file exists; recover only rebuilds a lost data file"
    rm -f "$file.recovering"
    # Needs a healthy cluster able to view-change (TigerBeetle's recovering docs).
    "$TB_BINARY" recover --cluster="$TB_CLUSTER_ID" --addresses="$TB_ADDRESSES" \
        --replica="$replica" --replica-count="$count" "$file.recovering"
    mv "$file.recovering" "$file"
    echo "tigerbeetle.sh: recovered replica $replica: $file; start it to state-sync"
}

cmd_health() {
    replica="${TB_REPLICA:?TB_REPLICA is required}"
    check_replica "$replica"
    address=$(printf '%s\n' "$TB_ADDRESSES" | cut -d, -f"$((replica + 1))")
    nc -z -w 2 "${address%:*}" "${address##*:}"
}

case "${1:-}" in
    start) cmd_start ;;
    bootstrap) shift; cmd_bootstrap "$@" ;;
    recover) cmd_recover ;;
    health) cmd_health ;;
    *) fail "usage: tigerbeetle.sh start | bootstrap REPLICA... | recover | health" ;;
esac
