#!/bin/sh
# Creates the secret files docker-compose.yml (and deploy/host-*.yml) mount as compose secrets,
# one value per file, in deploy/secrets/ (git- and docker-ignored) or $WALLETMIG_SECRETS_DIR:
#
#   deploy/make-secrets.sh            create every missing file; an existing file is never changed
#   deploy/make-secrets.sh --check    exit 1 naming every missing or empty file (before `up`)
#
# Never overwrites: the cluster id is baked into TigerBeetle's data files and the wallet id key
# into every wallet workflow id, so regenerating either breaks a deployment. To rotate a password,
# see README "Production secrets". Random values come from /dev/urandom (hex: URL- and
# config-safe). Permissions: the directory is 0700 (only its owner on the host reaches the files);
# the files are 0444 because compose without swarm bind-mounts them as they are, and each image
# reads them as its own user (walletmig 10001, mongodb 999, temporal 1000, root).
#
# Optional: MONGO_APP_USER (default walletmig, as docker-compose.yml), MONGO_MEMBERS (default the
# single-host file's mongo-0..2:27017; an application host lists the mongod hosts), REDIS_HOST.
set -eu
umask 077

here=$(cd "$(dirname "$0")" && pwd)
dir="${WALLETMIG_SECRETS_DIR:-$here/secrets}"
app_user="${MONGO_APP_USER:-walletmig}"
members="${MONGO_MEMBERS:-mongo-0:27017,mongo-1:27017,mongo-2:27017}"
redis_host="${REDIS_HOST:-redis}"
NAMES="tb-cluster-id mongo-root-password mongo-app-password mongodb-uri redis-password redis-url
temporal-db-password walletmig-codec-keys walletmig-id-hash-key walletmig-codec-server-token
grafana-admin-password"

fail() {
    echo "make-secrets.sh: $*" >&2
    exit 1
}

hex32() {
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
}

# 38 decimal digits, the first non-zero: ~126 random bits, below 2^128, never TigerBeetle's 0.
cluster_id() {
    first=$(LC_ALL=C tr -dc '1-9' </dev/urandom | head -c 1)
    rest=$(LC_ALL=C tr -dc '0-9' </dev/urandom | head -c 37)
    printf '%s%s' "$first" "$rest"
}

value_of() {
    case "$1" in
        tb-cluster-id) cluster_id ;;
        mongodb-uri) printf 'mongodb://%s:%s@%s/?replicaSet=rs0&authSource=admin&w=majority&journal=true&retryWrites=true' \
            "$app_user" "$(cat "$dir/mongo-app-password")" "$members" ;;
        redis-url) printf 'redis://:%s@%s:6379/0' "$(cat "$dir/redis-password")" "$redis_host" ;;
        # One `id:base64` AES-256 line (README "Payload encryption"; newest key last).
        walletmig-codec-keys) printf 'k%s:%s' "$(date -u +%Y%m%d)" \
            "$(head -c 32 /dev/urandom | base64 | tr -d '\n')" ;;
        *) hex32 ;;
    esac
}

check() {
    missing=0
    for name in $NAMES; do
        if [ ! -f "$dir/$name" ] || [ ! -s "$dir/$name" ]; then
            echo "make-secrets.sh: missing or empty: $dir/$name" >&2
            missing=$((missing + 1))
        fi
    done
    [ "$missing" -eq 0 ] || fail "$missing secret file(s) missing: run deploy/make-secrets.sh"
    echo "make-secrets.sh: every secret file is present in $dir"
}

create() {
    mkdir -p "$dir"
    chmod 700 "$dir"
    # Order matters: the URIs are built from the passwords before them.
    for name in $NAMES; do
        file="$dir/$name"
        if [ -e "$file" ]; then
            # Docker creates a missing bind-mount source as a directory: `up` ran first.
            [ ! -d "$file" ] || fail "$file is a directory (made by docker when \`up\` ran" \
                "before this script): remove it (rmdir) and run again"
            [ -f "$file" ] && [ -s "$file" ] || fail "$file exists but is not a non-empty file"
            echo "make-secrets.sh: kept    $file"
            continue
        fi
        rm -f "$file.tmp"
        value_of "$name" >"$file.tmp"
        echo >>"$file.tmp"
        [ "$(wc -c <"$file.tmp")" -gt 1 ] || fail "could not generate $name"
        chmod 444 "$file.tmp"
        mv "$file.tmp" "$file"
        echo "make-secrets.sh: created $file"
    done
}

case "${1:-}" in
    '') create ;;
    --check) check ;;
    *) fail "usage: make-secrets.sh [--check]" ;;
esac
