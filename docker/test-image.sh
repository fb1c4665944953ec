#!/usr/bin/env bash
# Builds the final stage of docker/Dockerfile with podman from a static binary built here
# (no registry is reachable, so BINARY=prebuilt replaces the builder stage), then checks the
# image the way a cluster would run it: as UID 65532, read-only root, no shell, all
# capabilities dropped, and /healthz answering. Usage: docker/test-image.sh [SERVICE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SERVICE=${1:-audit-sink}
TARGET=x86_64-unknown-linux-musl
TAG="localhost/engram-test/${SERVICE}:test"
PODMAN=(podman --runtime runc)
READY_TIMEOUT_SECS=${READY_TIMEOUT_SECS:-30}

die() { echo "test-image: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman is missing: run 'make setup'"

echo "==> cargo build --release --target $TARGET -p $SERVICE"
cargo build --quiet --release --locked --target "$TARGET" -p "$SERVICE"
binary="target/$TARGET/release/$SERVICE"
file "$binary" | grep -Eq "static(-pie)? linked|statically linked" || die "$binary is not static: $(file "$binary")"

context=$(mktemp -d)
container=""
cleanup() {
    [[ -n $container ]] && "${PODMAN[@]}" rm -f "$container" >/dev/null 2>&1 || true
    "${PODMAN[@]}" rmi -f "$TAG" >/dev/null 2>&1 || true
    rm -rf "$context"
}
trap cleanup EXIT

# The same root filesystem the builder stage makes.
rootfs="$context/prebuilt/rootfs"
install -D -m 0555 "$binary" "$rootfs/service"
install -D -m 0444 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'nonroot:x:65532:\n' >"$rootfs/etc/group"
install -d -m 1777 "$rootfs/tmp"

echo "==> podman build --target runtime (BINARY=prebuilt)"
"${PODMAN[@]}" build --quiet --file docker/Dockerfile --target runtime \
    --build-arg BINARY=prebuilt --build-arg SERVICE="$SERVICE" --tag "$TAG" "$context" >/dev/null

size=$("${PODMAN[@]}" image inspect "$TAG" --format '{{.Size}}')
user=$("${PODMAN[@]}" image inspect "$TAG" --format '{{.Config.User}}')
echo "image: $TAG, $((size / 1024 / 1024)) MiB, user $user"
[[ $user == 65532:65532 ]] || die "the image runs as '$user', not 65532:65532"
((size < 64 * 1024 * 1024)) || die "the image is $size bytes: more than 64 MiB"

# No shell to exec into.
if "${PODMAN[@]}" run --rm --entrypoint /bin/sh "$TAG" -c true >/dev/null 2>&1; then
    die "the image has a shell"
fi

# Run it as the chart does: read-only root, a tmpfs for /tmp, no capabilities, no new
# privileges; secrets from the dev env source (no Vault here), plain gRPC on free ports.
admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
grpc_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
container=$("${PODMAN[@]}" run --detach --network host --read-only --tmpfs /tmp:rw,size=16m \
    --cap-drop ALL --security-opt no-new-privileges \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    --env ENGRAM_ADMIN_ADDR="127.0.0.1:$admin_port" --env ENGRAM_GRPC_ADDR="127.0.0.1:$grpc_port" \
    --env ENGRAM_TLS_MODE=off --env ENGRAM_SECRET_SOURCE=env \
    --env ENGRAM_DOTENV_FILE=/nonexistent.env \
    --env ENGRAM_AUDIT_HMAC_KEY=image-test-only-key \
    --env ENGRAM_AUDIT_DIR=/tmp/audit \
    "$TAG")

deadline=$((SECONDS + READY_TIMEOUT_SECS))
until code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/healthz") && [[ $code == 200 ]]; do
    if ((SECONDS >= deadline)); then
        "${PODMAN[@]}" logs "$container" >&2 || true
        die "/healthz did not answer 200 within ${READY_TIMEOUT_SECS}s (last: $code)"
    fi
    if [[ $("${PODMAN[@]}" inspect "$container" --format '{{.State.Running}}') != true ]]; then
        "${PODMAN[@]}" logs "$container" >&2 || true
        die "the container exited"
    fi
    sleep 0.2
done
echo "/healthz: 200"
pid=$("${PODMAN[@]}" inspect "$container" --format '{{.State.Pid}}')
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[[ $uid == 65532 ]] || die "the process runs as UID $uid"
echo "process: UID $uid"

# A graceful stop: SIGTERM, drain, exit 0.
"${PODMAN[@]}" stop --time 20 "$container" >/dev/null
status=$("${PODMAN[@]}" inspect "$container" --format '{{.State.ExitCode}}')
[[ $status == 0 ]] || { "${PODMAN[@]}" logs "$container" >&2; die "exit code $status after SIGTERM"; }
echo "test-image: $SERVICE ok (stopped cleanly)"
