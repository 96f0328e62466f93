#!/bin/sh
# Write deploy/.env from deploy/.env.example, each CHANGE_ME replaced by its own random value (32 hex
# characters: safe in URLs and configuration files). An existing deploy/.env is left alone.
#   sh deploy/init-env.sh [TARGET]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${1:-$here/.env}
if [ -e "$target" ]; then
    echo "$target exists: left as it is" >&2
    exit 0
fi
umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        *=CHANGE_ME)
            secret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
            printf '%s\n' "${line%CHANGE_ME}$secret" ;;
        *) printf '%s\n' "$line" ;;
    esac
done < "$here/.env.example" > "$tmp"
mv "$tmp" "$target"
trap - EXIT
echo "wrote $target" >&2
