#!/bin/sh
# Entrypoint of the Sogni node and coordinator images (docs/PARTNERS.md).
#
#   sogni-entrypoint node [ARGS...]         secrets in place, then `exec sogni-node start ARGS`
#   sogni-entrypoint coordinator [ARGS...]  the same for `sogni-coordinator start ARGS`
#   sogni-entrypoint health node|coordinator  exit 0 iff GET /healthz on http_listen answers 2xx
#
# Why a script: partner clouds configure a container by environment alone and hand secrets
# over as mounted files or variables, while the daemons read a keystore file (mode 0600) and
# a password variable. This script turns one into the other and then `exec`s the daemon, so
# the daemon is PID 1's program and SIGTERM reaches Python (which finishes or hands back
# running jobs within shutdown_grace). Nothing secret is written outside the data dir, and
# the secret variables are unset before the exec.
#
# Secrets (PREFIX is SOGNI_NODE or SOGNI_COORDINATOR):
#   PREFIX_KEYSTORE_FILE   path of a mounted keystore (any mode): copied to DATA_DIR/.secrets
#   PREFIX_KEYSTORE_JSON   the keystore document itself, in a secret variable: written there
#   PREFIX_PASSWORD_FILE   path of a file holding the keystore password (trailing newlines cut)
#   PREFIX_PASSWORD        the password in a secret variable (the daemon's own default)
#   SOGNI_NODE_KEY=ephemeral  (node) no key given: create a throwaway one in the data dir;
#                          needs SOGNI_NODE_PAYOUT_ADDRESS so rewards outlive the container.
#
# Models (node; for platforms without volumes, e.g. SaladCloud):
#   SOGNI_NODE_MODEL_URLS  comma-separated `URL#sha256=HEX` of .safetensors checkpoints:
#                          each is downloaded once, checked against its digest, then added
#                          with `sogni-node models add` (a restart on the same disk skips it).
set -eu

die() {
    echo "sogni-entrypoint: $*" >&2
    exit 1
}

# getv NAME: the value of the variable NAME, or "" when unset.
getv() {
    eval "printf '%s' \"\${$1:-}\""
}

role_setup() {
    case "$1" in
        node)
            prefix=SOGNI_NODE cli=sogni-node keyname=wallet.json
            default_http=127.0.0.1:9860 default_dir="$HOME/.sogni/node"
            ;;
        coordinator)
            prefix=SOGNI_COORDINATOR cli=sogni-coordinator keyname=signer.json
            default_http=127.0.0.1:8080 default_dir="$HOME/.sogni/coordinator"
            ;;
        *) echo "usage: sogni-entrypoint node|coordinator [ARGS...] | health node|coordinator" >&2
           exit 2 ;;
    esac
}

health() {
    role_setup "${1:-}"
    listen=$(getv "${prefix}_HTTP_LISTEN")
    listen=${listen:-$default_http}
    [ "$listen" != off ] || die "${prefix}_HTTP_LISTEN is off: no health endpoint"
    port=${listen##*:}
    host=${listen%:*}
    case "$host" in
        "" | 0.0.0.0) host=127.0.0.1 ;;
        "[::]") host="[::1]" ;;
    esac
    # No proxy (a container's HTTP_PROXY must not see the probe); any non-2xx fails.
    exec python3 -c 'import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(sys.argv[1], timeout=5).close()
except Exception as exc:
    sys.exit(f"unhealthy: {sys.argv[1]}: {exc}")' "http://$host:$port/healthz"
}

# fetch_models LIST: download, verify and add each `URL#sha256=HEX` of LIST (see the top).
fetch_models() {
    models_dir=${SOGNI_NODE_MODELS_DIR:-$data_dir/models}
    done_dir="$models_dir/.fetched"
    mkdir -p "$done_dir"
    old_ifs=$IFS
    IFS=,
    # shellcheck disable=SC2086  # split on commas on purpose
    set -- $1
    IFS=$old_ifs
    for item in "$@"; do
        url=${item%%#*}
        digest=${item##*#sha256=}
        case "$digest" in
            "$item" | *[!0-9a-f]*) die "SOGNI_NODE_MODEL_URLS: $url needs #sha256=<64 hex digits>" ;;
        esac
        [ ${#digest} -eq 64 ] || die "SOGNI_NODE_MODEL_URLS: $url needs #sha256=<64 hex digits>"
        case "$url" in
            https://* | http://* | file://*) ;;
            *) die "SOGNI_NODE_MODEL_URLS: $url is not an http(s) or file URL" ;;
        esac
        [ ! -e "$done_dir/$digest" ] || continue
        name=$(basename "${url%%\?*}")
        case "$name" in *.safetensors) ;; *) name="$digest.safetensors" ;; esac
        python3 - "$url" "$done_dir/$name" "$digest" <<'PY' || die "SOGNI_NODE_MODEL_URLS: $url not fetched"
import hashlib, os, sys, urllib.request
url, dest, want = sys.argv[1:]
digest = hashlib.sha256()
with urllib.request.urlopen(url, timeout=60) as resp, open(dest + ".part", "wb") as out:
    while chunk := resp.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
if digest.hexdigest() != want:
    os.unlink(dest + ".part")
    sys.exit(f"sha256 of {url} is {digest.hexdigest()}, not {want}")
os.replace(dest + ".part", dest)
PY
        "$cli" models add "$done_dir/$name" >&2 || die "sogni-node models add refused $url"
        rm -f "$done_dir/$name"
        : >"$done_dir/$digest"
    done
}

# put_secret DEST: stdin to DEST, mode 0600, atomically (a reader never sees half a key).
put_secret() {
    (umask 077 && cat >"$1.tmp") && mv -f "$1.tmp" "$1"
}

main() {
    role_setup "${1:-}"
    shift
    data_dir=$(getv "${prefix}_DATA_DIR")
    data_dir=${data_dir:-$default_dir}
    secrets="$data_dir/.secrets"
    keystore_file=$(getv "${prefix}_KEYSTORE_FILE")
    keystore_json=$(getv "${prefix}_KEYSTORE_JSON")
    password_file=$(getv "${prefix}_PASSWORD_FILE")
    password_env=$(getv "${prefix}_PASSWORD_ENV")
    password_env=${password_env:-${prefix}_PASSWORD}
    key_mode=$(getv "${prefix}_KEY")
    unset "${prefix}_KEYSTORE_FILE" "${prefix}_KEYSTORE_JSON" "${prefix}_PASSWORD_FILE" \
        "${prefix}_KEY"

    if [ -n "$keystore_file" ] && [ -n "$keystore_json" ]; then
        die "set ${prefix}_KEYSTORE_FILE or ${prefix}_KEYSTORE_JSON, not both"
    fi
    if [ -n "$keystore_file" ] || [ -n "$keystore_json" ]; then
        mkdir -p "$secrets" && chmod 700 "$secrets"
        if [ -n "$keystore_file" ]; then
            [ -r "$keystore_file" ] || die "${prefix}_KEYSTORE_FILE: cannot read $keystore_file"
            put_secret "$secrets/$keyname" <"$keystore_file"
        else
            printf '%s' "$keystore_json" | put_secret "$secrets/$keyname"
        fi
        export "${prefix}_KEYSTORE=$secrets/$keyname"
    fi

    if [ -n "$password_file" ]; then
        [ -r "$password_file" ] || die "${prefix}_PASSWORD_FILE: cannot read $password_file"
        password=$(cat "$password_file")
        export "$password_env=$password"
        unset password
    fi

    case "$key_mode" in
        "") ;;
        ephemeral)
            [ "$prefix" = SOGNI_NODE ] || die "${prefix}_KEY=ephemeral is for nodes only"
            [ -z "$keystore_file$keystore_json" ] || die "SOGNI_NODE_KEY=ephemeral with a keystore"
            [ -n "${SOGNI_NODE_PAYOUT_ADDRESS:-}" ] ||
                die "SOGNI_NODE_KEY=ephemeral needs SOGNI_NODE_PAYOUT_ADDRESS (rewards would be lost)"
            keystore=${SOGNI_NODE_KEYSTORE:-$secrets/$keyname}
            mkdir -p "$secrets" && chmod 700 "$secrets"
            # A fresh key and password each start; the password lives in this process only.
            password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
            export "$password_env=$password" "SOGNI_NODE_KEYSTORE=$keystore"
            unset password
            "$cli" keys create --force >/dev/null
            ;;
        *) die "${prefix}_KEY: unknown value (only 'ephemeral')" ;;
    esac

    if [ "$prefix" = SOGNI_NODE ] && [ -n "${SOGNI_NODE_MODEL_URLS:-}" ]; then
        urls=$SOGNI_NODE_MODEL_URLS
        unset SOGNI_NODE_MODEL_URLS
        fetch_models "$urls"
    fi

    exec "$cli" start "$@"
}

case "${1:-}" in
    health) shift; health "$@" ;;
    *) main "$@" ;;
esac
