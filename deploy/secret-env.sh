#!/bin/sh
# Exports environment variables from secret files, then runs a command: for images that read a
# credential only from their environment and have no `*_FILE` convention of their own (Temporal's
# auto-setup: POSTGRES_PWD). docker-compose.yml mounts it read-only at /deploy.
#
#   secret-env.sh NAME=/run/secrets/FILE [NAME=FILE ...] -- COMMAND [ARG ...]
#
# A missing, unreadable or empty file stops the container at once with one line naming it. The
# value is exported to COMMAND's environment only: it never appears in docker-compose.yml,
# `docker inspect` or a command line. Trailing newlines are dropped (as `$(cat)` does).
set -eu

SECRETS_MAX=8

fail() {
    echo "secret-env.sh: $*" >&2
    exit 1
}

count=0
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    name="${1%%=*}"
    file="${1#*=}"
    case "$name" in
        '' | [0-9]* | *[!A-Za-z0-9_]*) fail "'$1': expected NAME=FILE" ;;
    esac
    [ "$file" != "$1" ] && [ -n "$file" ] || fail "'$1': expected NAME=FILE"
    [ -e "$file" ] || fail "$name: secret file $file is missing (deploy/make-secrets.sh)"
    # A bind mount of a missing host file may show up as an empty directory.
    [ -f "$file" ] || fail "$name: secret $file is not a file (deploy/make-secrets.sh)"
    [ -r "$file" ] || fail "$name: secret file $file is not readable by uid $(id -u)"
    value=$(cat "$file")
    [ -n "$value" ] || fail "$name: secret file $file is empty (deploy/make-secrets.sh)"
    export "$name=$value"
    count=$((count + 1))
    [ "$count" -le "$SECRETS_MAX" ] || fail "more than $SECRETS_MAX secrets"
    shift
done
[ "$#" -ge 2 ] || fail "usage: secret-env.sh NAME=FILE... -- COMMAND [ARG...]"
[ "$count" -ge 1 ] || fail "name at least one NAME=FILE before --"
shift
# exec: the command takes this process's place (signals from the init reach it directly).
exec "$@"
