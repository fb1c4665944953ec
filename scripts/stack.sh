#!/usr/bin/env bash
# Local Engram stack: an OpenBao dev server plus the four services, run from target/debug.
# Usage: scripts/stack.sh up|down|status|logs   (state in .engram/, see docs in `usage` below)
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/stack.sh <command>

  up      start OpenBao (dev mode), seed policies, AppRole roles and dev secrets, start the
          four services and wait until every /readyz answers 200
  down    stop the services, then OpenBao (SIGTERM, then SIGKILL after a deadline)
  status  show each process and its /readyz (OpenBao: /v1/sys/health) status code
  logs    follow every log (tail -F)
  verify  verify the local audit trail (.engram/audit) with engramctl

Environment:
  ENGRAM_VAULT_PORT          OpenBao dev listener port (default 8200; it also takes port+1)
  ENGRAM_SKIP_BUILD          when set, do not run `cargo build --workspace` first
  ENGRAM_READY_TIMEOUT_SECS  how long `up` waits for readiness (default 60)
  ENGRAM_STOP_TIMEOUT_SECS   how long `down` waits before SIGKILL (default 30)
  TELEGRAM_BOT_TOKEN, TELEGRAM_CHAT_ID, BINANCE_API_KEY, BINANCE_API_SECRET,
  API_KEY_CREATED_DATE, LMSTUDIO_API_KEY
                             seed values (environment, else repo-root .env) that replace
                             the generated dev secrets
EOF
}

# Everything this script creates (tokens, role ids, logs) is for the owner only.
umask 077

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.engram"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/logs"
PKI_DIR="$STATE/pki"
TOKEN_FILE="$STATE/vault-token"
# Generated dev secrets, kept across restarts so e.g. the audit HMAC chain stays verifiable.
DEV_SECRETS="$STATE/dev-secrets.json"
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
BAO_BIN="${ENGRAM_BAO_BIN:-$ROOT/.venv/bin/bao}"
# The port `up` used is remembered, so `status` finds a stack started with ENGRAM_VAULT_PORT.
VAULT_PORT="${ENGRAM_VAULT_PORT:-$(cat "$RUN_DIR/openbao.port" 2>/dev/null || echo 8200)}"
VAULT_ADDR="http://127.0.0.1:$VAULT_PORT"
READY_TIMEOUT="${ENGRAM_READY_TIMEOUT_SECS:-60}"
STOP_TIMEOUT="${ENGRAM_STOP_TIMEOUT_SECS:-30}"
VAULT_START_TIMEOUT=30
DEV_CHAT_ID=100000001

SERVICES=(telegram-gateway exchange-signer llm-advisor audit-sink)
declare -A GRPC_PORT=([telegram-gateway]=50051 [exchange-signer]=50052 [llm-advisor]=50053 [audit-sink]=50054)
declare -A ADMIN_PORT=([telegram-gateway]=9101 [exchange-signer]=9102 [llm-advisor]=9103 [audit-sink]=9104)
declare -A SECRET_PATH=([telegram-gateway]=engram/telegram [exchange-signer]=engram/exchange
                        [llm-advisor]=engram/llm [audit-sink]=engram/audit)

# Variables a service must not inherit from the caller: secrets the services get from Vault,
# and settings this script decides.
SCRUB_VARS=(TELEGRAM_BOT_TOKEN TELEGRAM_CHAT_ID BINANCE_API_KEY BINANCE_API_SECRET
            ENGRAM_AUDIT_HMAC_KEY LMSTUDIO_API_KEY BAO_TOKEN VAULT_TOKEN ENGRAM_VAULT_TOKEN
            ENGRAM_VAULT_TOKEN_FILE ENGRAM_VAULT_SECRET_ID ENGRAM_CONFIG_FILE ENGRAM_DOTENV_FILE)

say() { printf '==> %s\n' "$*"; }
warn() { printf 'stack.sh: %s\n' "$*" >&2; }
die() { warn "$*"; exit 1; }

rel() { printf '%s' "${1#"$ROOT"/}"; }

rand_hex() { # BYTES
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex "$1"
    else
        python3 -c 'import secrets, sys; print(secrets.token_hex(int(sys.argv[1])))' "$1"
    fi
}

# --- processes -------------------------------------------------------------------------

pid_file() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }

# True when PID is a live (not zombie) process whose command line mentions NEEDLE.
# The command-line check guards against a recycled pid.
pid_is() { # PID NEEDLE
    local pid=$1 needle=$2 cmdline="" tries=0
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # The command line reads empty for a moment while a process execs: look again.
    while [[ -z $cmdline ]] && ((tries++ < 20)); do
        pid_alive "$pid" || return 1
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || true
        [[ -n $cmdline ]] || sleep 0.05
    done
    [[ $cmdline == *"$needle"* ]]
}

# True while PID exists and is not a zombie.
pid_alive() { # PID
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

# A just-forked launcher subshell needs a moment to exec the real program (through nohup
# and setsid); wait for that, so later checks can rely on the command line.
await_exec() { # PID NEEDLE
    local deadline=$((SECONDS + 10))
    until pid_is "$1" "$2"; do
        pid_alive "$1" || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# What the command line of NAME's process contains.
needle_for() { # NAME
    case $1 in
        openbao) printf 'bao server' ;;
        exchange-double) printf '%s' "$BIN_DIR/engram-doubles exchange" ;;
        llm-double) printf '%s' "$BIN_DIR/engram-doubles llm" ;;
        telegram-double) printf '%s' "$BIN_DIR/engram-doubles telegram" ;;
        *) printf '%s' "$BIN_DIR/$1" ;;
    esac
}

# Prints the recorded pid of NAME (a service or "openbao") when that process still runs.
live_pid() { # NAME
    local file pid
    file=$(pid_file "$1")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    pid_is "$pid" "$(needle_for "$1")" || return 1
    printf '%s' "$pid"
}

port_in_use() { # PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

http_code() { # URL [BODY_FILE]
    curl -s -o "${2:-/dev/null}" -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

readyz_code() { http_code "http://127.0.0.1:${ADMIN_PORT[$1]}/readyz" "${2:-/dev/null}"; }
vault_health_code() { http_code "$VAULT_ADDR/v1/sys/health"; }

# OpenBao's dev banner prints its root token and unseal key: whatever shows a log to a
# person goes through this filter. (The files themselves are owner-only, like vault-token.)
redact() { sed -u -E 's/(Root Token|Unseal Key)([^:]*):.*/\1\2: [redacted]/'; }

# Last lines of a log, indented and redacted.
log_tail() { # FILE [LINES]
    [[ -f $1 ]] || { echo "    (no log at $(rel "$1"))"; return 0; }
    tail -n "${2:-25}" "$1" | redact | sed 's/^/    /'
}

# SIGTERM every named process, wait for all of them up to the deadline, then SIGKILL.
stop_group() { # NAME...
    local name pid waiting=() still=() deadline
    for name in "$@"; do
        if pid=$(live_pid "$name"); then
            say "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            waiting+=("$name:$pid")
        fi
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    while ((${#waiting[@]})); do
        still=()
        for entry in "${waiting[@]}"; do
            pid_is "${entry#*:}" "$(needle_for "${entry%%:*}")" || continue
            still+=("$entry")
        done
        waiting=(${still[@]+"${still[@]}"})
        ((${#waiting[@]})) || break
        if ((SECONDS >= deadline)); then
            for entry in "${waiting[@]}"; do
                warn "${entry%%:*} (pid ${entry#*:}) did not stop within ${STOP_TIMEOUT}s: SIGKILL"
                kill -KILL "${entry#*:}" 2>/dev/null || true
            done
            break
        fi
        sleep 0.2
    done
    for name in "$@"; do rm -f "$(pid_file "$name")"; done
}

cmd_down() {
    # The audit sink goes last, so it records the others' SERVICE_STOPPED.
    local clients=() svc
    for svc in "${SERVICES[@]}"; do [[ $svc == audit-sink ]] || clients+=("$svc"); done
    stop_group "${clients[@]}"
    stop_group audit-sink
    stop_group exchange-double llm-double telegram-double
    stop_group openbao
    rm -f "$RUN_DIR/openbao.port"
    # The AppRole credentials died with the in-memory dev server; `up` issues new ones.
    rm -f "$RUN_DIR"/.vault-header.* "$RUN_DIR"/*.role_id "$RUN_DIR"/*.secret_id "$RUN_DIR"/exchange-double-keys.json \
        "$RUN_DIR"/telegram-double-token.json
    say "stack is down"
}

# --- vault -----------------------------------------------------------------------------

VAULT_HEADER=""
UP_IN_PROGRESS=0

on_exit() {
    local rc=$?
    [[ -z $VAULT_HEADER ]] || rm -f "$VAULT_HEADER"
    if ((rc != 0 && UP_IN_PROGRESS)); then
        UP_IN_PROGRESS=0
        warn "up failed: stopping what was started"
        cmd_down || true
    fi
}
trap on_exit EXIT

# Calls the Vault HTTP API with the root token (sent from a file: never on a command line).
vault_api() { # METHOD PATH [curl args...]
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body --max-time 10 -X "$method" -H "@$VAULT_HEADER" "$@" "$VAULT_ADDR/v1/$path"
}

# Same, with a JSON body read from stdin; the response is discarded (it holds no secrets
# for the writes this script does, but there is nothing to show either).
vault_write() { # METHOD PATH
    local out
    if ! out=$(vault_api "$1" "$2" -H 'Content-Type: application/json' --data-binary @-); then
        die "Vault $1 /v1/$2 failed: $out"
    fi
}

start_vault() {
    if port_in_use "$VAULT_PORT" || port_in_use "$((VAULT_PORT + 1))"; then
        die "port $VAULT_PORT or $((VAULT_PORT + 1)) is already in use; pick another with ENGRAM_VAULT_PORT"
    fi
    if [[ ! -s $TOKEN_FILE ]]; then
        rand_hex 24 >"$TOKEN_FILE"
    fi
    chmod 600 "$TOKEN_FILE"
    local log="$LOG_DIR/openbao.log" pid deadline
    # The root token goes in through the environment (BAO_DEV_ROOT_TOKEN_ID is the same as
    # -dev-root-token-id) so it does not show in `ps`; -dev-no-store-token keeps
    # ~/.vault-token untouched.
    (
        cd "$STATE"
        BAO_DEV_ROOT_TOKEN_ID="$(<"$TOKEN_FILE")"
        export BAO_DEV_ROOT_TOKEN_ID
        exec nohup setsid "$BAO_BIN" server -dev \
            -dev-no-store-token -dev-listen-address="127.0.0.1:$VAULT_PORT" \
            >"$log" 2>&1 </dev/null
    ) &
    pid=$!
    echo "$pid" >"$(pid_file openbao)"
    echo "$VAULT_PORT" >"$RUN_DIR/openbao.port"
    await_exec "$pid" "$(needle_for openbao)" || true
    say "OpenBao dev server starting on $VAULT_ADDR (pid $pid)"
    deadline=$((SECONDS + VAULT_START_TIMEOUT))
    until [[ $(vault_health_code) == 200 ]]; do
        if ! pid_alive "$pid"; then
            warn "OpenBao exited during start; last lines of $(rel "$log"):"
            log_tail "$log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            warn "OpenBao not healthy after ${VAULT_START_TIMEOUT}s; last lines of $(rel "$log"):"
            log_tail "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# Reads NAME from the repo-root .env without executing it: last `NAME=value` (optionally
# `export`ed) wins; surrounding quotes and trailing ` # comments` on bare values are removed.
dotenv_get() { # NAME
    local file="$ROOT/.env" value
    [[ -f $file ]] || return 0
    value=$(sed -n -E "s/^[[:space:]]*(export[[:space:]]+)?$1[[:space:]]*=[[:space:]]*(.*)$/\2/p" "$file" | tail -n 1)
    value=${value%$'\r'}
    if [[ $value =~ ^\"(.*)\"[[:space:]]*(#.*)?$ || $value =~ ^\'(.*)\'[[:space:]]*(#.*)?$ ]]; then
        value=${BASH_REMATCH[1]}
    else
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"}
    fi
    printf '%s' "$value"
}

# True for an unfilled .env.example placeholder such as YOUR_BINANCE_API_KEY_HERE.
is_placeholder() { [[ $1 =~ ^YOUR_[A-Z0-9_]*_HERE$ ]]; }

# Sets SEED_<NAME> and SEED_<NAME>_FROM for a seed variable: environment, else .env.
seed_var() { # NAME
    local name=$1 value from=""
    value=${!name:-}
    if [[ -n $value ]] && ! is_placeholder "$value"; then
        from="environment"
    else
        value=$(dotenv_get "$name")
        if is_placeholder "$value"; then value=""; fi
        [[ -n $value ]] && from=".env"
    fi
    printf -v "SEED_$name" '%s' "$value"
    printf -v "SEED_${name}_FROM" '%s' "$from"
}

# "generated" or "NAME (source)", for the summary: never the value.
origin() { # NAME
    local from_var="SEED_${1}_FROM"
    if [[ -n ${!from_var} ]]; then printf '%s (%s)' "$1" "${!from_var}"; else printf 'generated'; fi
}

seed_secrets() {
    local name
    for name in TELEGRAM_BOT_TOKEN TELEGRAM_CHAT_ID BINANCE_API_KEY BINANCE_API_SECRET \
        API_KEY_CREATED_DATE LMSTUDIO_API_KEY; do
        seed_var "$name"
    done
    if [[ -n $SEED_TELEGRAM_CHAT_ID && ! $SEED_TELEGRAM_CHAT_ID =~ ^-?[0-9]+$ ]]; then
        die "TELEGRAM_CHAT_ID from $SEED_TELEGRAM_CHAT_ID_FROM is not a numeric chat id"
    fi
    if [[ -n $SEED_API_KEY_CREATED_DATE && ! $SEED_API_KEY_CREATED_DATE =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
        die "API_KEY_CREATED_DATE from $SEED_API_KEY_CREATED_DATE_FROM is not a YYYY-MM-DD date"
    fi

    if [[ ! -s $DEV_SECRETS ]]; then
        DEV_BOT_TOKEN="200000001:dev-$(rand_hex 16)" DEV_API_KEY="$(rand_hex 32)" \
            DEV_API_SECRET="$(rand_hex 32)" DEV_HMAC_KEY="$(rand_hex 32)" \
            jq -n '{bot_token: $ENV.DEV_BOT_TOKEN, api_key: $ENV.DEV_API_KEY,
                    api_secret: $ENV.DEV_API_SECRET, hmac_key: $ENV.DEV_HMAC_KEY}' >"$DEV_SECRETS"
    fi
    chmod 600 "$DEV_SECRETS"

    local chat=${SEED_TELEGRAM_CHAT_ID:-$DEV_CHAT_ID}
    local chat_origin="dev chat id $DEV_CHAT_ID"
    [[ -n $SEED_TELEGRAM_CHAT_ID ]] && chat_origin=$(origin TELEGRAM_CHAT_ID)

    # Values reach jq through its environment only (not argv), and Vault through stdin.
    V_TOKEN="$SEED_TELEGRAM_BOT_TOKEN" V_CHAT="$chat" jq -n --slurpfile dev "$DEV_SECRETS" \
        '{data: {bot_token: ($ENV.V_TOKEN | if . == "" then $dev[0].bot_token else . end),
                 allowed_chats: $ENV.V_CHAT, admin_chat: $ENV.V_CHAT,
                 users: ($ENV.V_CHAT + ":admin")}}' |
        vault_write POST secret/data/engram/telegram
    say "secret/engram/telegram: bot_token $(origin TELEGRAM_BOT_TOKEN); chat/admin $chat_origin"
    if [[ -z ${ENGRAM_TELEGRAM_API_URL:-} ]]; then
        # The Telegram double accepts exactly the token just written to Vault (owner-only file).
        V_TOKEN="$SEED_TELEGRAM_BOT_TOKEN" jq -n --slurpfile dev "$DEV_SECRETS" \
            '{bot_token: ($ENV.V_TOKEN | if . == "" then $dev[0].bot_token else . end)}' \
            >"$RUN_DIR/telegram-double-token.json"
        chmod 600 "$RUN_DIR/telegram-double-token.json"
    fi

    V_KEY="$SEED_BINANCE_API_KEY" V_SECRET="$SEED_BINANCE_API_SECRET" jq -n --slurpfile dev "$DEV_SECRETS" \
        '{data: {api_key: ($ENV.V_KEY | if . == "" then $dev[0].api_key else . end),
                 api_secret: ($ENV.V_SECRET | if . == "" then $dev[0].api_secret else . end)}}' |
        vault_write POST secret/data/engram/exchange
    if [[ -z ${ENGRAM_EXCHANGE_URL:-} ]]; then
        # The exchange double accepts exactly the key just written to Vault (owner-only file).
        V_KEY="$SEED_BINANCE_API_KEY" V_SECRET="$SEED_BINANCE_API_SECRET" jq -n --slurpfile dev "$DEV_SECRETS" \
            '{api_key: ($ENV.V_KEY | if . == "" then $dev[0].api_key else . end),
              api_secret: ($ENV.V_SECRET | if . == "" then $dev[0].api_secret else . end)}' \
            >"$RUN_DIR/exchange-double-keys.json"
        chmod 600 "$RUN_DIR/exchange-double-keys.json"
    fi
    local created=${SEED_API_KEY_CREATED_DATE:-$(date -u +%F)}
    V_CREATED="$created" jq -n '{custom_metadata: {created: $ENV.V_CREATED}}' |
        vault_write POST secret/metadata/engram/exchange
    say "secret/engram/exchange: api_key $(origin BINANCE_API_KEY), api_secret $(origin BINANCE_API_SECRET), created $created"

    V_LLM="$SEED_LMSTUDIO_API_KEY" jq -n \
        '{data: ({provider: "lmstudio"} + (if $ENV.V_LLM == "" then {} else {api_key: $ENV.V_LLM} end))}' |
        vault_write POST secret/data/engram/llm
    if [[ -n $SEED_LMSTUDIO_API_KEY ]]; then
        say "secret/engram/llm: provider, api_key $(origin LMSTUDIO_API_KEY)"
    else
        say "secret/engram/llm: provider only (no api_key)"
    fi

    jq -n --slurpfile dev "$DEV_SECRETS" '{data: {hmac_key: $dev[0].hmac_key}}' |
        vault_write POST secret/data/engram/audit
    say "secret/engram/audit: hmac_key generated"
}

configure_vault() {
    VAULT_HEADER=$(mktemp "$RUN_DIR/.vault-header.XXXXXX")
    printf 'X-Vault-Token: %s\n' "$(<"$TOKEN_FILE")" >"$VAULT_HEADER"

    local svc policy out
    for svc in "${SERVICES[@]}"; do
        policy="$ROOT/deploy/vault/policies/$svc.hcl"
        [[ -f $policy ]] || die "missing policy $(rel "$policy")"
        jq -n --rawfile p "$policy" '{policy: $p}' | vault_write PUT "sys/policies/acl/$svc"
    done
    say "policies written: ${SERVICES[*]}"

    if ! out=$(vault_api GET sys/auth); then die "cannot list auth methods: $out"; fi
    if ! jq -e '.data["approle/"] // ."approle/"' <<<"$out" >/dev/null; then
        jq -n '{type: "approle"}' | vault_write POST sys/auth/approle
    fi
    for svc in "${SERVICES[@]}"; do
        V_POLICY="$svc" jq -n '{token_policies: [$ENV.V_POLICY], token_ttl: "1h", token_max_ttl: "24h"}' |
            vault_write POST "auth/approle/role/$svc"
        if ! out=$(vault_api GET "auth/approle/role/$svc/role-id"); then die "cannot read role id of $svc: $out"; fi
        jq -er '.data.role_id' <<<"$out" >"$RUN_DIR/$svc.role_id" || die "no role id for $svc"
        if ! out=$(vault_api POST "auth/approle/role/$svc/secret-id"); then die "cannot create a secret id for $svc"; fi
        jq -er '.data.secret_id' <<<"$out" >"$RUN_DIR/$svc.secret_id" || die "no secret id for $svc"
        chmod 600 "$RUN_DIR/$svc.role_id" "$RUN_DIR/$svc.secret_id"
    done
    out=""
    say "AppRole roles and fresh secret ids: .engram/run/<service>.role_id / .secret_id"

    configure_pki
    seed_secrets
    rm -f "$VAULT_HEADER"
}

# The mutual-TLS CA: a PKI mount with a root, one role per identity (the services and the
# operator's engramctl), each allowed only its own spiffe://engram/<name> URI SAN. Each
# service asks for its own certificate with its AppRole token (deploy/vault/policies); the
# operator's is issued here with the root token into .engram/pki/ for engramctl.
configure_pki() {
    local out name
    mkdir -p "$PKI_DIR"
    chmod 700 "$PKI_DIR"
    jq -n '{type: "pki", config: {max_lease_ttl: "87600h"}}' | vault_write POST sys/mounts/pki
    if ! out=$(jq -n '{common_name: "Engram dev CA", ttl: "87600h", key_type: "ec", key_bits: 256}' |
        vault_api POST pki/root/generate/internal -H 'Content-Type: application/json' --data-binary @-); then
        die "cannot create the dev CA: $out"
    fi
    jq -er '.data.certificate' <<<"$out" >"$PKI_DIR/ca.crt" || die "no CA certificate"
    for name in "${SERVICES[@]}" engramctl; do
        sed "s/SERVICE/$name/" "$ROOT/deploy/vault/pki-role.json" | vault_write POST "pki/roles/$name"
    done
    if ! out=$(jq -n '{uri_sans: "spiffe://engram/engramctl", ttl: "24h", private_key_format: "pkcs8"}' | # pragma: allowlist secret
        vault_api POST pki/issue/engramctl -H 'Content-Type: application/json' --data-binary @-); then
        die "cannot issue the operator's certificate: $out"
    fi
    (
        umask 077
        jq -er '.data.private_key' <<<"$out" >"$PKI_DIR/engramctl.key"
    ) || die "no operator key"
    jq -er '.data.certificate' <<<"$out" >"$PKI_DIR/engramctl.crt" || die "no operator certificate"
    out=""
    say "PKI: dev CA in $(rel "$PKI_DIR")/ca.crt, a role per identity, engramctl's 24 h certificate"
}

# --- outside-world doubles ---------------------------------------------------------------

TELEGRAM_DOUBLE_ADDR=127.0.0.1:8081
EXCHANGE_DOUBLE_ADDR=127.0.0.1:8082
LLM_DOUBLE_ADDR=127.0.0.1:1234

# Starts one double (`engram-doubles SUBCOMMAND`, with the caller's exported settings) on
# ADDR and waits until PROBE_PATH answers 200.
start_double() { # NAME SUBCOMMAND ADDR PROBE_PATH
    local name=$1 subcommand=$2 addr=$3 probe=$4 log="$LOG_DIR/$1.log" pid deadline
    port_in_use "${addr##*:}" && die "port ${addr##*:} ($name) is already in use"
    (
        cd "$ROOT"
        exec nohup setsid "$BIN_DIR/engram-doubles" "$subcommand" >"$log" 2>&1 </dev/null
    ) &
    pid=$!
    echo "$pid" >"$(pid_file "$name")"
    await_exec "$pid" "$(needle_for "$name")" || true
    deadline=$((SECONDS + 20))
    until [[ $(http_code "http://$addr$probe") == 200 ]]; do
        pid_alive "$pid" || { log_tail "$log" >&2; die "$name exited during start"; }
        ((SECONDS < deadline)) || die "$name did not answer within 20s"
        sleep 0.2
    done
    say "$name on http://$addr (pid $pid)"
}

# The Binance-compatible exchange double, unless ENGRAM_EXCHANGE_URL points elsewhere
# (Binance's spot testnet, say). It accepts the key just written to Vault.
start_exchange_double() {
    [[ -z ${ENGRAM_EXCHANGE_URL:-} ]] || { say "exchange: $ENGRAM_EXCHANGE_URL (no double)"; return 0; }
    ENGRAM_DOUBLE_EXCHANGE_ADDR="$EXCHANGE_DOUBLE_ADDR" \
        ENGRAM_DOUBLE_EXCHANGE_KEYS_FILE="$RUN_DIR/exchange-double-keys.json" \
        start_double exchange-double exchange "$EXCHANGE_DOUBLE_ADDR" /api/v3/time
}

# The Telegram Bot API double, unless ENGRAM_TELEGRAM_API_URL points at the real Bot API
# (https://api.telegram.org with the seed's TELEGRAM_BOT_TOKEN). `engramctl chat` talks to it.
start_telegram_double() {
    [[ -z ${ENGRAM_TELEGRAM_API_URL:-} ]] || { say "Telegram: $ENGRAM_TELEGRAM_API_URL (no double)"; return 0; }
    ENGRAM_DOUBLE_TELEGRAM_ADDR="$TELEGRAM_DOUBLE_ADDR" \
        ENGRAM_DOUBLE_TELEGRAM_TOKEN_FILE="$RUN_DIR/telegram-double-token.json" \
        start_double telegram-double telegram "$TELEGRAM_DOUBLE_ADDR" /control/stats
}

# The OpenAI-compatible LLM double, unless LMSTUDIO_URL points at a real LM Studio.
start_llm_double() {
    [[ -z ${LMSTUDIO_URL:-} ]] || { say "LLM: $LMSTUDIO_URL (no double)"; return 0; }
    ENGRAM_DOUBLE_LLM_ADDR="$LLM_DOUBLE_ADDR" start_double llm-double llm "$LLM_DOUBLE_ADDR" /v1/models
}

# --- services --------------------------------------------------------------------------

start_service() { # NAME
    local svc=$1 log="$LOG_DIR/$1.log" bin="$BIN_DIR/$1" pid
    (
        cd "$ROOT"
        unset "${SCRUB_VARS[@]}"
        # Exported in this subshell only, so nothing shows on a command line.
        export ENGRAM_GRPC_ADDR="127.0.0.1:${GRPC_PORT[$svc]}"
        export ENGRAM_ADMIN_ADDR="127.0.0.1:${ADMIN_PORT[$svc]}"
        export ENGRAM_SECRET_SOURCE=vault
        export ENGRAM_SECRET_PATH="${SECRET_PATH[$svc]}"
        export ENGRAM_SECRET_REFRESH_SECS=5
        export ENGRAM_VAULT_ADDR="$VAULT_ADDR"
        export ENGRAM_VAULT_KV_MOUNT=secret
        export ENGRAM_VAULT_AUTH=approle
        export ENGRAM_VAULT_AUTH_MOUNT=approle
        ENGRAM_VAULT_ROLE_ID="$(<"$RUN_DIR/$svc.role_id")"
        export ENGRAM_VAULT_ROLE_ID
        export ENGRAM_VAULT_SECRET_ID_FILE="$RUN_DIR/$svc.secret_id"
        export ENGRAM_LOG_FORMAT="${ENGRAM_LOG_FORMAT:-json}"
        # Mutual TLS on every gRPC hop, each certificate from the dev PKI (pki/issue/<svc>).
        export ENGRAM_TLS_MODE=vault
        if [[ $svc == llm-advisor ]]; then
            export LMSTUDIO_URL="${LMSTUDIO_URL:-http://$LLM_DOUBLE_ADDR}"
        fi
        if [[ $svc == telegram-gateway ]]; then
            export ENGRAM_TELEGRAM_API_URL="${ENGRAM_TELEGRAM_API_URL:-http://$TELEGRAM_DOUBLE_ADDR}"
        fi
        if [[ $svc == exchange-signer || $svc == audit-sink ]]; then
            # Their alerts go to the admin chat through the gateway.
            export ENGRAM_ALERT_ADDR="https://127.0.0.1:${GRPC_PORT[telegram-gateway]}"
        fi
        if [[ $svc == exchange-signer ]]; then
            export ENGRAM_EXCHANGE_URL="${ENGRAM_EXCHANGE_URL:-http://$EXCHANGE_DOUBLE_ADDR}"
        fi
        if [[ $svc == audit-sink ]]; then
            # The trail stays in .engram/audit across restarts, for `engramctl audit verify`.
            export ENGRAM_AUDIT_DIR="$STATE/audit"
        else
            # Every other service records SERVICE_STARTED / SERVICE_STOPPED there.
            export ENGRAM_AUDIT_ADDR="https://127.0.0.1:${GRPC_PORT[audit-sink]}"
        fi
        exec nohup setsid "$bin" >"$log" 2>&1 </dev/null
    ) &
    pid=$!
    echo "$pid" >"$(pid_file "$svc")"
    await_exec "$pid" "$(needle_for "$svc")" || true
    say "$svc starting (pid $pid, gRPC 127.0.0.1:${GRPC_PORT[$svc]}, admin 127.0.0.1:${ADMIN_PORT[$svc]})"
}

# Prints why SERVICE failed (log tail and /readyz body) to stderr.
report_failure() { # SERVICE REASON
    local svc=$1 body
    warn "$svc $2"
    warn "last lines of $(rel "$LOG_DIR/$svc.log"):"
    log_tail "$LOG_DIR/$svc.log" >&2
    body=$(mktemp)
    warn "GET /readyz -> $(readyz_code "$svc" "$body"): $(head -c 2000 "$body")"
    rm -f "$body"
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT)) pending=("${SERVICES[@]}") next svc failed=0
    while ((${#pending[@]})); do
        next=()
        for svc in "${pending[@]}"; do
            if ! pid_alive "$(<"$(pid_file "$svc")")"; then
                report_failure "$svc" "exited during start"
                failed=1
                continue
            fi
            [[ $(readyz_code "$svc") == 200 ]] || next+=("$svc")
        done
        ((failed == 0)) || break
        pending=(${next[@]+"${next[@]}"})
        ((${#pending[@]})) || break
        if ((SECONDS >= deadline)); then
            for svc in "${pending[@]}"; do report_failure "$svc" "not ready after ${READY_TIMEOUT}s"; done
            failed=1
            break
        fi
        sleep 0.25
    done
    ((failed == 0)) || exit 1
}

print_table() {
    printf '\n%-18s %-17s %-24s %s\n' SERVICE GRPC ADMIN LOG
    printf '%-18s %-17s %-24s %s\n' openbao - "$VAULT_ADDR" "$(rel "$LOG_DIR/openbao.log")"
    local svc
    for svc in "${SERVICES[@]}"; do
        printf '%-18s %-17s %-24s %s\n' "$svc" "127.0.0.1:${GRPC_PORT[$svc]}" \
            "http://127.0.0.1:${ADMIN_PORT[$svc]}" "$(rel "$LOG_DIR/$svc.log")"
    done
    cat <<EOF

Admin endpoints: /healthz /readyz /metrics.  Dev root token: $(rel "$TOKEN_FILE") (dev only).
Follow logs: scripts/stack.sh logs    Status: scripts/stack.sh status    Stop: scripts/stack.sh down
EOF
}

cmd_up() {
    local tool
    for tool in curl jq setsid nohup; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is required (make setup installs it)"
    done
    [[ -x $BAO_BIN ]] || die "OpenBao CLI not found at $(rel "$BAO_BIN"): run 'make setup'"
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE/audit" "$STATE/pki"
    chmod 700 "$STATE"

    # Already up? Partly up? Stale pid files (after a reboot) are simply removed.
    local name port running=() stopped=()
    for name in openbao "${SERVICES[@]}"; do
        if live_pid "$name" >/dev/null; then running+=("$name"); else
            rm -f "$(pid_file "$name")"
            stopped+=("$name")
        fi
    done
    if ((${#stopped[@]} == 0)); then
        say "the stack is already up"
        print_table
        exit 0
    fi
    if ((${#running[@]})); then
        die "the stack is partly up (running: ${running[*]}; stopped: ${stopped[*]}): run 'scripts/stack.sh down' first"
    fi

    if [[ -z ${ENGRAM_SKIP_BUILD:-} ]]; then
        say "cargo build --workspace"
        (cd "$ROOT" && cargo build --workspace)
    fi
    local svc
    for svc in "${SERVICES[@]}"; do
        [[ -x $BIN_DIR/$svc ]] || die "missing $(rel "$BIN_DIR/$svc"): run 'cargo build --workspace'"
        [[ -x $BIN_DIR/engram-doubles ]] || die "missing $(rel "$BIN_DIR/engram-doubles"): run 'cargo build --workspace'"
        for port in "${GRPC_PORT[$svc]}" "${ADMIN_PORT[$svc]}"; do
            port_in_use "$port" && die "port $port (for $svc) is already in use by another process"
        done
    done

    # From here on, any failure (a `die`, a failed check) takes the stack down again.
    UP_IN_PROGRESS=1
    start_vault
    configure_vault
    start_telegram_double
    start_exchange_double
    start_llm_double
    for svc in "${SERVICES[@]}"; do start_service "$svc"; done
    say "waiting up to ${READY_TIMEOUT}s for every /readyz to answer 200"
    wait_ready
    UP_IN_PROGRESS=0
    say "the stack is up"
    print_table
}

cmd_status() {
    local name pid code all_ok=0
    printf '%-18s %-8s %-8s %s\n' PROCESS PID STATE HTTP
    if pid=$(live_pid openbao); then
        code=$(vault_health_code)
        printf '%-18s %-8s %-8s %s\n' openbao "$pid" running "$code (/v1/sys/health)"
        [[ $code == 200 ]] || all_ok=3
    else
        printf '%-18s %-8s %-8s %s\n' openbao - stopped -
        all_ok=3
    fi
    if pid=$(live_pid telegram-double); then
        printf '%-18s %-8s %-8s %s\n' telegram-double "$pid" running "$(http_code "http://$TELEGRAM_DOUBLE_ADDR/control/stats") (/control/stats)"
    fi
    if pid=$(live_pid llm-double); then
        printf '%-18s %-8s %-8s %s\n' llm-double "$pid" running "$(http_code "http://$LLM_DOUBLE_ADDR/v1/models") (/v1/models)"
    fi
    if pid=$(live_pid exchange-double); then
        printf '%-18s %-8s %-8s %s\n' exchange-double "$pid" running "$(http_code "http://$EXCHANGE_DOUBLE_ADDR/api/v3/time") (/api/v3/time)"
    fi
    for name in "${SERVICES[@]}"; do
        if pid=$(live_pid "$name"); then
            code=$(readyz_code "$name")
            printf '%-18s %-8s %-8s %s\n' "$name" "$pid" running "$code (/readyz)"
            [[ $code == 200 ]] || all_ok=3
        else
            printf '%-18s %-8s %-8s %s\n' "$name" - stopped -
            all_ok=3
        fi
    done
    return "$all_ok"
}

cmd_logs() {
    local logs=()
    shopt -s nullglob
    logs=("$LOG_DIR"/*.log)
    ((${#logs[@]})) || die "no logs in $(rel "$LOG_DIR") yet: run 'scripts/stack.sh up'"
    tail -n 20 -F "${logs[@]}" | redact
}

# Verifies the local audit trail offline with engramctl; the dev audit key (version 1 in the
# dev Vault) goes to it on standard input, never on a command line.
cmd_verify() {
    [[ -d $STATE/audit ]] || die "no audit trail yet: run 'make up' first"
    [[ -f $DEV_SECRETS ]] || die "no dev secrets in $(rel "$DEV_SECRETS")"
    [[ -n ${ENGRAM_SKIP_BUILD:-} ]] || (cd "$ROOT" && cargo build --quiet -p engramctl)
    jq -c '{"1": .hmac_key}' "$DEV_SECRETS" | "$BIN_DIR/engramctl" audit verify "$STATE/audit" --keys -
}

case "${1:-}" in
    up) cmd_up ;;
    verify) cmd_verify ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
