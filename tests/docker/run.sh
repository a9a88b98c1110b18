#!/usr/bin/env bash
# The real-Docker-engine test of relay-sidecar: the image, the compose examples and the app's restarts,
# in the topology users have (the relay in the app container's network namespace, the services on the
# host across a bridge). Linux, as root. Run by scripts/docker-test; prints `docker: N passed, M failed`
# last and exits non-zero when anything failed.
#
# Steps:
#  1. Install what is missing from Debian's packages (docker.io, docker-compose, debootstrap, ...).
#  2. Start a private dockerd: its own data root, exec root, pidfile and socket under a run folder in
#     /tmp, private subnets, --iptables=false and --ip-forward=false (nothing here is forwarded or
#     NATed: container -> host traffic is delivered locally), so it touches no firewall rule.
#  3. Base image (no registry is reachable, nothing is pulled): debootstrap --variant=minbase bookworm from
#     the machine's apt mirror with python3 and its venv module, the host's CA bundle copied in,
#     `docker import`. Saved with `docker save` to the cache folder and loaded from there on reruns.
#  4. Build the project's Dockerfile with --build-arg BASE_IMAGE=<that image>; check the image's user,
#     entrypoint, stop signal and labels, and that it starts with a read-only root and no capabilities.
#  5. Each example (socat-dropin, many-ports) with tests/docker/override.yaml laid over it (local images;
#     app DNS: nxdomain_dns.py on the docker0 address, as this machine has no reachable resolver): start
#     the "host" services (host_services.py) on a bridge address -- socat-dropin has no extra_hosts, so
#     its relay falls back to the app network's gateway; many-ports maps host.docker.internal to docker0
#     -- wait for the relay's `ready`, check its target line and `relay healthcheck`, run app_client.py in
#     the app container (payload round trip and half-close over 127.0.0.1 and ::1 to every port; UDP
#     datagrams to many-ports' StatsD port 8125), time
#     `docker stop` of the relay (SIGTERM as PID 1), `down`.
#  6. The app restarts (many-ports again; the app has `restart: unless-stopped` from the override): `docker
#     restart app`, `kill -9` of the app's process from here (the engine's restart policy restarts it) and
#     `docker stop app; sleep 2; docker start app` (while stopped, the relay must keep running and its
#     /readyz say `stranded`). Each time, with no manual step, an echo through the app's localhost:3000
#     must work again within 8 s (a bounded probe loop from inside the app), by one relay restart after
#     its `app restarted ... exit code 75` line. Prints how long after the app's start the relay started
#     (Docker's StartedAt) and how long after the action localhost worked again (`rejoin:` lines).
#     Then `docker rm -f app`: the relay keeps running and its log and /readyz name the fix.
#  7. The holder example (tests/docker/override-holder.yaml): `docker restart app`; localhost:8000 works
#     again and the relay never restarted.
#  8. The host-socket example (tests/docker/override-host-socket.yaml): the "host" service listens on
#     127.0.0.1 and on a socket file (host_services.py unix:PATH:PORT) in a folder bind-mounted read-only
#     into the relay; the app's localhost:5432 reaches it through the file (echo and half-close, 127.0.0.1
#     and ::1), the relay running as uid 10001 with a read-only root. The reverse too: the relay listens
#     on a socket file in a tmpfs volume it shares with the app (app_client.py s:PATH:PORT), and removes
#     it on docker stop.
#  8b. docker-host's layout (issue 18): the relay as a container of its own on a user network, configured
#     the docker-host way (PORTS only, no capabilities), named docker-host; another container on that
#     network reaches docker-host:2323 by name, TCP and UDP, through to the host service on docker0.
#  9. On exit, whatever happened: compose down, stop the services and dockerd by pid, unmount and remove
#     the run folder, delete the bridges and cgroups the engine made, restore ip_forward and the bridge
#     sysctls, and check that the firewall rules are as they were. A run also clears what an aborted
#     earlier run left (its engine, container processes, mounts, bridges).
#
# Environment: RELAY_TEST_CACHE (default /var/cache/relay-sidecar), RELAY_TEST_BIP (docker0 address,
# default 172.30.213.1/24), RELAY_TEST_POOL (compose networks, default 172.30.216.0/21).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/tests/docker
# shellcheck source=tests/engine-lib.sh
. "$REPO/tests/engine-lib.sh"
CACHE_DIR=${RELAY_TEST_CACHE:-/var/cache/relay-sidecar}
BIP=${RELAY_TEST_BIP:-172.30.213.1/24}
POOL=${RELAY_TEST_POOL:-172.30.216.0/21}
DOCKER0_IP=${BIP%/*}
RUN_PREFIX=/tmp/relay-docker-test.
LOCK_FILE=/run/lock/relay-docker-test.lock
STOP_LIMIT_MS=1000

passed=0
failed=0
RUN_STARTED=$(date +%s)
RUN=""
DOCKERD_PID=""
DOCKER0_OURS=0
BG_PIDS=()
PROJECTS=()
REJOIN=()
SYSCTL_SAVED=()
FIREWALL_BEFORE=""

# ---------------------------------------------------------------------------------------------------
# Preflight and packages

if [ "$(uname -s)" != Linux ] || [ "$(id -u)" -ne 0 ]; then
    echo "docker: skipped: the Docker engine test needs root on Linux"
    exit 0
fi

install_missing() {
    local -a want=()
    command -v dockerd > /dev/null || want+=(docker.io)
    command -v debootstrap > /dev/null || want+=(debootstrap)
    command -v ip > /dev/null || want+=(iproute2)
    command -v flock > /dev/null || want+=(util-linux)
    command -v openssl > /dev/null || want+=(openssl)
    if [ -z "${RELAY_SKIP_ARM64:-}" ] && [ "$(dpkg --print-architecture)" != arm64 ]; then
        [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || want+=(qemu-user-static)
        command -v update-binfmts > /dev/null || want+=(binfmt-support)
    fi
    command -v pgrep > /dev/null || want+=(procps)
    [ -x /usr/bin/python3 ] || want+=(python3)
    /usr/bin/python3 -c 'import yaml' 2> /dev/null || want+=(python3-yaml)
    if ! docker compose version > /dev/null 2>&1 && ! command -v docker-compose > /dev/null; then
        want+=(docker-compose)
    fi
    apt_install "${want[@]}"
}

# Which Compose: the v2 plugin when the docker CLI has it, else docker-compose (Debian's is v1).
pick_compose() {
    if docker compose version > /dev/null 2>&1; then
        COMPOSE=(docker compose)
    else
        COMPOSE=(docker-compose)
    fi
    COMPOSE_VERSION=$("${COMPOSE[@]}" version --short 2> /dev/null || echo unknown)
    COMPOSE_VERSION=${COMPOSE_VERSION#v}
}

# ---------------------------------------------------------------------------------------------------
# Cleanup: used for this run on exit and for the run folder of an aborted earlier run.

container_cgroups() { # the cgroup folders of the containers of the engine whose run folder is $1
    local id
    for id in "$1"/data/containers/*; do
        id=${id##*/}
        [ "$id" = "*" ] && continue
        compgen -G "/sys/fs/cgroup/*/docker/$id" || true
        compgen -G "/sys/fs/cgroup/docker/$id" || true
    done
}

clean_run_dir() {
    local dir=$1 pid mnt cgroup i
    if [ -f "$dir/dockerd.pid" ]; then
        pid=$(cat "$dir/dockerd.pid" 2> /dev/null || true)
        if [ -n "$pid" ] && alive "$pid"; then stop_pid "$pid" 20; fi
    fi
    # An engine that died hard leaves its containers' processes running: find them by their cgroups.
    for cgroup in $(container_cgroups "$dir"); do
        while read -r pid; do kill -KILL "$pid" 2> /dev/null || true; done < <(cat "$cgroup/cgroup.procs" 2> /dev/null)
    done
    for pid in $(pids_using "$dir"); do stop_pid "$pid" 5; done
    for ((i = 0; i < 50; i++)); do # their processes gone, the cgroups can go (up to 5 s)
        cgroup=$(container_cgroups "$dir")
        [ -z "$cgroup" ] && break
        # shellcheck disable=SC2086 # a list of paths without spaces
        rmdir $cgroup 2> /dev/null || sleep 0.1
    done
    # Mounts the engine left (overlays, shm, netns files), deepest first.
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r mnt; do
        umount -l "$mnt" 2> /dev/null || true
    done
    rm -rf "$dir"
}

delete_engine_links() {
    local link addr
    # Bridges of compose networks: named br-<id>, addressed inside our pool.
    for link in $(ip -o link show type bridge | awk -F': ' '{ print $2 }' | grep '^br-' || true); do
        for addr in $(ip -o -4 addr show dev "$link" | awk '{ print $4 }'); do
            if in_pool "${addr%/*}"; then ip link delete "$link" 2> /dev/null || true; fi
        done
    done
}

in_pool() { # is IPv4 address $1 inside $POOL?
    /usr/bin/python3 -c 'import ipaddress, sys; sys.exit(ipaddress.ip_address(sys.argv[1]) not in ipaddress.ip_network(sys.argv[2]))' "$1" "$POOL"
}

save_sysctls() {
    local key
    for key in net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables; do
        if [ -e "/proc/sys/${key//.//}" ]; then SYSCTL_SAVED+=("$key=$(sysctl -n "$key")"); fi
    done
}

restore_sysctls() {
    local entry
    for entry in "${SYSCTL_SAVED[@]}"; do sysctl -q -w "$entry" > /dev/null 2>&1 || true; done
}

cleanup() {
    local status=$? project pid entry leftovers="" checked=""
    trap - EXIT INT TERM
    set +e
    log "cleaning up"
    if [ -n "$DOCKERD_PID" ] && alive "$DOCKERD_PID"; then
        for project in "${PROJECTS[@]}"; do compose_down "$project"; done
        docker ps -aq | xargs -r docker rm -f > /dev/null 2>&1
    fi
    for pid in "${BG_PIDS[@]}"; do stop_pid "$pid" 5; done
    if [ -n "$DOCKERD_PID" ]; then
        stop_pid "$DOCKERD_PID" 20
        wait "$DOCKERD_PID" 2> /dev/null
    fi
    if [ -n "$RUN" ]; then clean_run_dir "$RUN"; fi
    if [ -n "$DOCKERD_PID" ]; then
        delete_engine_links
        if [ "$DOCKER0_OURS" = 1 ]; then ip link delete docker0 2> /dev/null; fi
        if ! engine_running; then remove_cgroups docker_cgroups; fi
        restore_sysctls
        restore_binfmt
        # The verdict on the cleanup itself.
        ip link show docker0 > /dev/null 2>&1 && [ "$DOCKER0_OURS" = 1 ] && leftovers+="docker0 bridge; "
        [ -n "$RUN" ] && grep -qF "$RUN" /proc/self/mountinfo && leftovers+="mounts under $RUN; "
        [ -n "$RUN" ] && [ -e "$RUN" ] && leftovers+="$RUN; "
        ! engine_running && [ -n "$(docker_cgroups)" ] && leftovers+="docker cgroups; "
        [ "$(firewall_rules)" != "$FIREWALL_BEFORE" ] && leftovers+="firewall rules changed; "
        for entry in "${SYSCTL_SAVED[@]}"; do
            [ "$(sysctl -n "${entry%%=*}")" != "${entry#*=}" ] && leftovers+="${entry%%=*} changed; "
        done
        checked="engine stopped; no bridge, mount, cgroup, firewall rule or sysctl change left behind"
    fi
    finish docker "$checked" "$leftovers" "$status"
}

# ---------------------------------------------------------------------------------------------------
# Engine

docker_cgroups() { # dockerd's cgroup folders (cgroupfs: docker/ and a container's docker/ID), deepest first
    find /sys/fs/cgroup -maxdepth 4 -type d \( -path '*/docker' -o -path '*/docker/*' \) 2> /dev/null | sort -r
}

engine_running() { # is some dockerd alive on this machine?
    local pid
    for pid in $(pgrep -x dockerd || true); do
        if alive "$pid"; then return 0; fi
    done
    return 1
}

start_dockerd() {
    local i
    if ip link show docker0 > /dev/null 2>&1; then
        if engine_running; then
            echo "another Docker engine runs here (docker0 exists); stop it first" >&2
            return 1
        fi
        ip link delete docker0 # a leftover without an engine: an aborted run's
    fi
    DOCKER0_OURS=1
    save_sysctls
    FIREWALL_BEFORE=$(firewall_rules)
    export DOCKER_HOST="unix://$RUN/docker.sock"
    log "starting dockerd (data and exec root under $RUN)"
    # In a session of its own: a Ctrl-C to this script must not stop the engine before the cleanup has
    # taken the containers down. (Not a group leader here, so setsid execs dockerd: $! is dockerd's pid.)
    setsid dockerd --data-root "$RUN/data" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" -H "$DOCKER_HOST" \
        --iptables=false --ip-forward=false --ip-masq=false --userland-proxy=false \
        --bip "$BIP" --default-address-pool "base=$POOL,size=24" > "$RUN/dockerd.log" 2>&1 9>&- &
    DOCKERD_PID=$!
    for ((i = 0; i < 300; i++)); do # up to 30 s
        if docker version > /dev/null 2>&1; then
            [ "$(cat "$RUN/dockerd.pid")" = "$DOCKERD_PID" ] && return 0
            echo "dockerd's pidfile names $(cat "$RUN/dockerd.pid"), not $DOCKERD_PID" >&2
            return 1
        fi
        alive "$DOCKERD_PID" || break
        sleep 0.1
    done
    echo "dockerd did not come up:" >&2
    tail -20 "$RUN/dockerd.log" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------------
# The image

build_context() { # $RUN/context: what .dockerignore lets in, plus wheels/ (scripts/fetch-wheels, cached)
    local ctx=$RUN/context key wheels
    mkdir -p "$ctx"
    cp -r "$REPO"/{Dockerfile,.dockerignore,pyproject.toml,README.md,LICENSE,relay,docker} "$ctx"/
    find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
    key=$(cat "$REPO/pyproject.toml" "$REPO/scripts/fetch-wheels" | sha256sum | cut -c1-12)
    wheels=$CACHE_DIR/wheels-$key
    if [ ! -d "$wheels" ]; then
        log "scripts/fetch-wheels (once; cached as $wheels)"
        rm -rf "$CACHE_DIR"/wheels-*
        if ! PYTHON=$PY timeout 300 "$REPO/scripts/fetch-wheels" "$wheels.partial" > "$RUN/fetch-wheels.log" 2>&1; then
            tail -20 "$RUN/fetch-wheels.log" >&2
            return 1
        fi
        mv "$wheels.partial" "$wheels"
    fi
    cp -r "$wheels" "$ctx/wheels"
    CONTEXT=$ctx
}

# build_image TAG BASE [PLATFORM [ARG...]]: the offline build (README "Offline build"): the base loaded from a tar,
# the wheels in the context, and no network at all for the build's steps (--network none).
build_image() { # build_image TAG BASE [PLATFORM [DOCKER_BUILD_ARG...]]
    local tag=$1 base=$2 platform=${3:-}
    shift 3 2> /dev/null || shift $#
    local -a args=(--network none --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$VERSION" "$@")
    if [ -n "$platform" ]; then args+=(--platform "$platform"); fi
    log "docker build --network none ${platform:+--platform $platform }(BASE_IMAGE=$base)"
    DOCKER_BUILDKIT=0 timeout 900 docker build -q "${args[@]}" -t "$tag" "$CONTEXT" > "$RUN/build-${tag##*:}.log" 2>&1
}

offline_failure() { # without wheels/ and without network, the build's last line must name the cause
    local ctx=$RUN/context-nowheels output last
    cp -r "$CONTEXT" "$ctx"
    rm -rf "$ctx/wheels"
    if output=$(DOCKER_BUILDKIT=0 timeout 300 docker build --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t relay-sidecar:no-network "$ctx" 2>&1); then
        fail "offline: a build without wheels/ and without network succeeded"
        return 0
    fi
    # The builder's own last words ("The command ... returned a non-zero code") follow the step's output.
    last=$(printf '%s\n' "$output" | grep -v "^The command '\|^ ---> \|^Removing intermediate\|^$" | tail -1)
    if [[ $last == "build needs network: pip install"*"see README 'Offline build'" ]]; then
        pass "offline: without wheels/ and network the build fails, its last line: ${last:0:100}..."
    else
        fail "offline: the failed build's last line names the missing network" "$(printf '%s\n' "$output" | tail -8)"
    fi
}

check_image_config() {
    local got want
    got=$(docker image inspect -f '{{.Config.User}}|{{json .Config.Entrypoint}}|{{.Config.StopSignal}}' "$RELAY_IMAGE")
    want='10001:10001|["relay"]|SIGTERM'
    [ "$got" = "$want" ] || { echo "user|entrypoint|stopsignal: $got, expected $want"; return 1; }
    for label in title description source licenses version; do
        got=$(docker image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$RELAY_IMAGE")
        [ -n "$got" ] || { echo "label org.opencontainers.image.$label missing"; return 1; }
    done
    got=$(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' "$RELAY_IMAGE")
    [ "$got" = "$VERSION" ] || { echo "label org.opencontainers.image.version: $got, expected $VERSION"; return 1; }
    got=$(timeout 30 docker run --rm --network none "$RELAY_IMAGE" --version 2>&1)
    [ "$got" = "relay-sidecar $VERSION" ] || { echo "relay --version: $got, expected relay-sidecar $VERSION"; return 1; }
}

check_image_contents() { # distroless: no shell, no package manager, no pip anywhere in the image
    local cid found
    cid=$(docker create "$RELAY_IMAGE" 2> /dev/null)
    found=$(docker export "$cid" | tar -t | grep -E '(^|/)(sh|bash|dash|busybox|apt|apt-get|dpkg|pip[0-9.]*|ensurepip)/?$' || true)
    docker rm "$cid" > /dev/null
    [ -z "$found" ] || { echo "found: $found"; return 1; }
    if timeout 30 docker run --rm --network none --entrypoint sh "$RELAY_IMAGE" -c true > /dev/null 2>&1; then
        echo "docker run --entrypoint sh ran a shell"
        return 1
    fi
}

report_size() {
    local total base gz
    total=$(docker image inspect -f '{{.Size}}' "$RELAY_IMAGE")
    gz=$(docker save "$RELAY_IMAGE" | gzip -c | wc -c)
    echo "image size: $((total / 1000000)) MB uncompressed, $((gz / 1000000)) MB as a gzipped docker save" \
        "($((total / 1000)) kB, $((gz / 1000)) kB); before issue 19: 127 MB on the same base"
}

# ---------------------------------------------------------------------------------------------------
# Every module the relay needs at run time, inside the built image (issue 19): TCP, UDP, Unix sockets,
# TLS, metrics, reload (SIGHUP) and `relay check`, in a container of the image with no network but its
# own loopback; the "host" services run inside it too, on the image's own python.

exercise_image() {
    local dir=$RUN/exercise cid t0 output startup
    log "the image's run-time modules: TCP, UDP, Unix, TLS, metrics, reload, check"
    mkdir -m 0777 "$dir"
    printf '%s\n' "ports: \"8000:18000 8125:18125/udp\"" "target: 127.0.0.1" "metrics: 127.0.0.1:9464" "routes:" \
        "  - {name: sock-in, listen: 'unix:/x/relay.sock', mode: '0666', target: '127.0.0.1:18000'}" \
        "  - {name: sock-out, listen: 5432, target: 'unix:/x/host.sock'}" \
        "  - {name: tls-in, listen: 8443, target: '127.0.0.1:18000', tls: {cert: /x/cert.pem, key: /x/key.pem}}" \
        "  - {name: tls-out, listen: 8444, target: '127.0.0.1:18443', target_tls: {cafile: /x/cert.pem, server_name: localhost}}" \
        > "$dir/relay.yaml"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost -keyout "$dir/key.pem" -out "$dir/cert.pem" > /dev/null 2>&1
    chmod 0644 "$dir"/*.pem
    t0=$(now_ms)
    cid=$(docker run -d --network none --sysctl net.ipv6.conf.all.disable_ipv6=0 --read-only --cap-drop ALL \
        -v "$dir:/x" -v "$HERE:/t:ro" \
        "$RELAY_IMAGE" --config /x/relay.yaml)
    if ! wait_for_relay "$cid"; then
        fail "image: relay started from a YAML file" "$(relay_logs "$cid")"
        docker rm -f "$cid" > /dev/null
        return 0
    fi
    startup=$(($(now_ms) - t0))
    # The "host" services, inside the container (no shell there to redirect: runpy with stdout to a file).
    docker exec -d "$cid" python3 -c 'import runpy, sys; sys.stdout = open("/x/services.log", "w", buffering=1)
sys.argv = ["host_services.py", "127.0.0.1", "18000", "18125", "unix:/x/host.sock:5432"]
runpy.run_path("/t/host_services.py", run_name="__main__")'
    if ! wait_for_line "$dir/services.log" ready 20; then
        fail "image: host services inside the image" "$(cat "$dir/services.log" 2> /dev/null)"
        docker rm -f "$cid" > /dev/null
        return 0
    fi
    if output=$(run_client "$cid" 4:8000:18000 6:8000:18000 u4:8125:18125 s:/x/relay.sock:18000 4:5432:5432 2>&1); then
        pass "image: TCP (127.0.0.1, ::1), UDP, a Unix socket listener and a Unix socket target relay through the image ($startup ms to ready)"
    else
        fail "image: TCP, UDP and Unix sockets through the image" "$output
$(relay_logs "$cid")"
    fi
    # TLS: a handshake through the image's python, then the relay's own TLS both ways (tls_handshake.py).
    if output=$(timeout 60 docker exec "$cid" python3 /t/tls_handshake.py /x/cert.pem /x/key.pem 8443 8444 2>&1); then
        pass "image: $output"
    else
        fail "image: TLS in the image (python's ssl, the relay's tls and target_tls routes)" "$output
$(relay_logs "$cid")"
    fi
    if output=$(timeout 30 docker exec "$cid" python3 -c 'import urllib.request
print(urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10).read().decode())' 2>&1) &&
        [[ $output == *"relay_build_info{version=\"$VERSION\"}"* && $output == *relay_bytes_total* ]]; then
        pass "image: /metrics serves relay_build_info{version=\"$VERSION\"} and the byte counters"
    else
        fail "image: /metrics" "${output:0:2000}"
    fi
    echo "  - {name: added, listen: 8001, target: '127.0.0.1:18000'}" >> "$dir/relay.yaml"
    docker kill -s HUP "$cid" > /dev/null
    if wait_for_log "$cid" "reloaded: 1 route(s) added" 10 && output=$(run_client "$cid" 4:8001:18000 2>&1); then
        pass "image: SIGHUP reloads the YAML file; the added route relays"
    else
        fail "image: reload on SIGHUP" "$output
$(relay_logs "$cid")"
    fi
    # Every target answers but tls-out's, whose TLS upstream runs only during tls_handshake.py: exit 1.
    local code=0
    output=$(timeout 60 docker exec "$cid" relay check --config /x/relay.yaml 2>&1) || code=$?
    if [ "$code" = 1 ] && [[ $output == *"6 of 7 target(s) answer"* ]] &&
        grep -qE '^tls-out +127\.0\.0\.1:18443 +refused' <<< "$output"; then
        pass "image: relay check probes every route (6 of 7 answer; tls-out's upstream is down: refused, exit 1)"
    else
        fail "image: relay check: exit 1, tls-out refused, the 6 others answering (exit $code)" "$output"
    fi
    # The image's HEALTHCHECK command as the engine runs it (it reads the config file the relay was given).
    local -a probe
    mapfile -t probe < <(docker image inspect -f '{{range $i, $w := .Config.Healthcheck.Test}}{{if $i}}{{println $w}}{{end}}{{end}}' "$RELAY_IMAGE" | sed '/^$/d')
    if output=$(timeout 30 docker exec -e RELAY_CONFIG=/x/relay.yaml "$cid" "${probe[@]}" 2>&1); then
        pass "image: its HEALTHCHECK command (${probe[*]}) exits 0 inside the image"
    else
        fail "image: the HEALTHCHECK command (${probe[*]}) inside the image" "$output"
    fi
    # Its own cost: peak resident memory of the probe's module run the same way.
    if output=$(timeout 30 docker exec -e RELAY_METRICS=127.0.0.1:9464 "$cid" python3 -I -c 'import resource, runpy
try:
    runpy.run_module("relay.probe", run_name="__main__")
except SystemExit as e:
    print("health check exit", e.code, end=", ")
print("peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "MiB")' 2>&1); then
        echo "$output; start-up to ready: $startup ms"
    fi
    docker rm -f "$cid" > /dev/null
}

memory_limit() { # the relay under docker run --memory 128m: it finds the limit and outlives clients that stop reading
    local cid output state
    log "the relay under --memory 128m with 2,000 clients that stop reading"
    cid=$(docker run -d --network none --memory 128m --memory-swap 128m --read-only --cap-drop ALL \
        -e RELAY_PORTS="7000:17000 7001:7002" -e RELAY_TARGET=127.0.0.1 -e RELAY_LISTEN=127.0.0.1 \
        -e RELAY_METRICS=127.0.0.1:9464 "$RELAY_IMAGE")
    if ! wait_for_relay "$cid"; then
        fail "memory: relay started under --memory 128m" "$(relay_logs "$cid")"
        docker rm -f "$cid" > /dev/null
        return 0
    fi
    if docker logs "$cid" 2>&1 | grep -q "memory: container limit 128 MiB (cgroup v[12]); at most 32 MiB buffered"; then
        pass "memory: the relay reads its container's 128 MiB limit and buffers at most 32 MiB"
    else
        fail "memory: the limit line at start" "$(relay_logs "$cid")"
    fi
    # The clients in the app's place: a container of their own in the relay's network namespace.
    local code=0
    output=$(timeout 120 docker run --rm --network "container:$cid" -v "$HERE:/t:ro" -v "$REPO/bench:/b/bench:ro" \
        -e PYTHONPATH=/b "$BASE_IMAGE" python3 /t/stalled_clients.py 7000 17000 7001 2000 2> "$RUN/stalled.err") || code=$?
    state=$(docker inspect -f '{{.State.Running}} OOMKilled={{.State.OOMKilled}}' "$cid")
    if [ "$code" = 0 ] && [ "$state" = "true OOMKilled=false" ]; then
        pass "memory: $output; the relay lives on ($state)"
    else
        fail "memory: 2,000 stalled clients under --memory 128m (exit $code, $state)" "$output
$(tail -20 "$RUN/stalled.err")
$(relay_logs "$cid")"
    fi
    docker rm -f "$cid" > /dev/null
}

# ---------------------------------------------------------------------------------------------------
# Compose examples

compose() { # compose PROJECT ARGS...: the example's file (made Compose-v1-loadable if needed) + override
    local project=$1
    shift
    RELAY_TEST_BASE_IMAGE=$BASE_IMAGE RELAY_TEST_IMAGE=$RELAY_IMAGE RELAY_TEST_DNS=$DOCKER0_IP \
        timeout 120 "${COMPOSE[@]}" -p "$project" -f "$RUN/$project.compose.yaml" -f "$RUN/$project.override.yaml" "$@"
}

compose_down() {
    compose "$1" down -t 1 --remove-orphans > /dev/null 2>&1 || true
}

compose_up() { # compose_up PROJECT EXAMPLE [OVERRIDE]: OVERRIDE defaults to tests/docker/override.yaml
    local project=$1 example=$REPO/compose-examples/$2/compose.yaml
    cp "${3:-$HERE/override.yaml}" "$RUN/$project.override.yaml"
    if [[ $COMPOSE_VERSION == 1.* ]]; then
        "$PY" "$HERE/compose_v1.py" "$example" "$RUN/$project.compose.yaml"
    else
        cp "$example" "$RUN/$project.compose.yaml"
    fi
    PROJECTS+=("$project")
    compose "$project" up -d > "$RUN/$project.up.log" 2>&1 || { cat "$RUN/$project.up.log"; return 1; }
}

container() { compose "$1" ps -q "$2"; }

start_host_services() { # start_host_services ADDRESS PORT...: the "host" services, until `ready`
    local out=$RUN/services-$1.log
    "$PY" "$HERE/host_services.py" "$@" > "$out" 2>&1 9>&- &
    BG_PIDS+=($!)
    wait_for_line "$out" ready 10 || { cat "$out"; return 1; }
}

start_dns() {
    local out=$RUN/dns.log
    "$PY" "$HERE/nxdomain_dns.py" "$DOCKER0_IP" > "$out" 2>&1 9>&- &
    BG_PIDS+=($!)
    wait_for_line "$out" ready 10 || { cat "$out"; return 1; }
}

wait_for_line() { # wait_for_line FILE TEXT SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qF -- "$2" "$1" 2> /dev/null && return 0
        sleep 0.1
    done
    return 1
}

wait_for_relay() { # the relay logs `ready` once every listener is bound
    local cid=$1 i
    for ((i = 0; i < 200; i++)); do
        [[ "$(docker logs "$cid" 2>&1)" == *ready* ]] && return 0
        [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = true ] || break
        sleep 0.1
    done
    return 1
}

wait_for_log() { # wait_for_log CONTAINER TEXT SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        [[ "$(docker logs "$1" 2>&1)" == *"$2"* ]] && return 0
        sleep 0.1
    done
    return 1
}

run_client() { # run_client APP_CONTAINER CHECK...
    local cid=$1
    shift
    timeout 90 docker exec -i "$cid" python3 - "$@" < "$HERE/app_client.py"
}

check_stop() { # docker stop of the relay: well under a second (SIGTERM handled as PID 1), exit code 0
    local cid=$1 t0 t1 code
    t0=$(now_ms)
    docker stop -t 10 "$cid" > /dev/null
    t1=$(now_ms)
    code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    STOP_DETAIL="$((t1 - t0)) ms, exit code $code"
    [ $((t1 - t0)) -lt "$STOP_LIMIT_MS" ] && [ "$code" = 0 ]
}

relay_logs() { docker logs "$1" 2>&1 | tail -30; }

example() { # example NAME PROJECT gateway|docker0 "PORT..." CHECK...: one compose example, end to end
    local name=$1 project=$2 where=$3 ports=$4
    shift 4
    local app relay address output target_line
    log "example $name"
    if ! compose_up "$project" "$name"; then
        fail "$name: compose up"
        return 0
    fi
    app=$(container "$project" app)
    relay=$(container "$project" relay)
    if [ "$where" = gateway ]; then # no extra_hosts: the relay falls back to the app network's gateway
        address=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}' "$app")
        target_line="using default gateway $address"
    else # extra_hosts host-gateway: host.docker.internal is the docker0 address
        address=$DOCKER0_IP
        target_line="host.docker.internal -> $address"
    fi
    # shellcheck disable=SC2086 # $ports is a list of ports
    if ! start_host_services "$address" $ports; then
        fail "$name: host services on $address"
        return 0
    fi
    if ! wait_for_relay "$relay"; then
        fail "$name: relay never logged ready" "$(relay_logs "$relay")"
        return 0
    fi
    if wait_for_log "$relay" "$target_line" 10; then # resolved in the background: may follow `ready`
        pass "$name: relay logged its target: '$target_line'"
    else
        fail "$name: relay did not log '$target_line'" "$(relay_logs "$relay")"
    fi
    if output=$(timeout 20 docker exec "$relay" relay healthcheck 2>&1); then
        pass "$name: relay healthcheck (the image's HEALTHCHECK) exits 0: ${output:0:40}..."
    else
        fail "$name: relay healthcheck inside the relay container" "$output"
    fi
    # README's command for `relay check` (`docker compose exec relay relay check`; -T: no terminal here),
    # where the relay is configured by RELAY_* (socat-dropin's arguments would have to be given again).
    if [ "$name" != socat-dropin ]; then
        if output=$(compose "$project" exec -T relay relay check 2>&1); then
            pass "$name: '${COMPOSE[*]} exec relay relay check' (README's command) exits 0"
        else
            fail "$name: '${COMPOSE[*]} exec relay relay check'" "$output"
        fi
    fi
    if output=$(run_client "$app" "$@" 2>&1); then
        pass "$name: echo and half-close through localhost, $# port/family checks ($1 ...), reach $address"
    else
        fail "$name: round trip and half-close via localhost to $address" "$output
relay log:
$(relay_logs "$relay")"
    fi
    if check_stop "$relay"; then
        pass "$name: docker stop of the relay: $STOP_DETAIL"
    else
        fail "$name: docker stop of the relay: $STOP_DETAIL (limit $STOP_LIMIT_MS ms, exit 0)" "$(relay_logs "$relay")"
    fi
    compose_down "$project"
    if [ -z "$(compose "$project" ps -q 2> /dev/null)" ] &&
        ! docker network inspect "${project}_default" > /dev/null 2>&1; then
        pass "$name: down removed its containers and network"
    else
        fail "$name: down left containers or networks"
    fi
    stop_pid "${BG_PIDS[-1]}" 5
}

# ---------------------------------------------------------------------------------------------------
# The app restarts (issue 8, part 3): the relay must follow it into its new network namespace

# Run in the app container: one echo round trip through localhost:PORT (the host service's `E` mode).
PROBE='import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
    s.settimeout(1)
    s.sendall(b"Eping")
    got = b""
    while len(got) < 4 and (data := s.recv(16)):
        got += data
sys.exit(got != b"ping")'

wait_for_localhost() { # wait_for_localhost APP PORT T0_MS LIMIT_MS: until localhost:PORT works from the app
    local app=$1 port=$2 t0=$3 limit=$4 i
    for ((i = 0; i < 300; i++)); do # bounded in count and in time
        if timeout 3 docker exec "$app" python3 -c "$PROBE" "$port" > /dev/null 2>&1; then
            BACK_MS=$(($(now_ms) - t0))
            return 0
        fi
        [ $(($(now_ms) - t0)) -gt "$limit" ] && break
        sleep 0.1
    done
    BACK_MS=$(($(now_ms) - t0))
    return 1
}

started_ms() { date -d "$(docker inspect -f '{{.State.StartedAt}}' "$1")" +%s%3N; }

relay_state() { # what a failure report needs: the relay's state, interfaces and last log lines
    docker inspect -f 'relay: running={{.State.Running}} exit={{.State.ExitCode}} restarts={{.RestartCount}} error={{.State.Error}}' "$1"
    docker exec "$1" cat /proc/net/dev 2>&1 | awk 'NR > 2 { print "interface " $1 }'
    relay_logs "$1"
}

app_restart_case() { # app_restart_case HOW APP RELAY: the app starts again one way; localhost must follow
    local how=$1 app=$2 relay=$3 restarts t0 gap output
    restarts=$(docker inspect -f '{{.RestartCount}}' "$relay")
    case $how in
        "docker restart")
            docker restart -t 1 "$app" > /dev/null
            t0=$(now_ms)
            ;;
        "kill -9")
            t0=$(now_ms)
            kill -KILL "$(docker inspect -f '{{.State.Pid}}' "$app")"
            ;;
        "docker stop, start")
            docker stop -t 1 "$app" > /dev/null
            sleep 2
            # Stranded meanwhile: still running (an exit now could never rejoin a stopped app), and saying so.
            output=$(timeout 20 docker exec "$relay" relay healthcheck 2>&1) && output="exit 0: $output"
            if [ "$(docker inspect -f '{{.State.Running}}' "$relay")" = true ] && [[ $output == *stranded* ]]; then
                pass "app stopped: the relay keeps running and its /readyz says why: ${output:0:90}..."
            else
                fail "app stopped: relay running with a 'stranded' reason in /readyz" "$output
$(relay_state "$relay")"
            fi
            docker start "$app" > /dev/null
            t0=$(now_ms)
            ;;
    esac
    if ! wait_for_localhost "$app" 3000 "$t0" 8000; then
        fail "$how app: localhost:3000 through the relay did not work again within $BACK_MS ms" "$(relay_state "$relay")"
        return 0
    fi
    gap=$(($(started_ms "$relay") - $(started_ms "$app")))
    if [ "$(docker inspect -f '{{.RestartCount}}' "$relay")" -eq $((restarts + 1)) ] &&
        [[ "$(docker logs "$relay" 2>&1)" == *"app restarted"*"exit code 75"* ]]; then
        pass "$how app: relay exited 75 and restarted $gap ms after the app started; localhost:3000 works again $BACK_MS ms after '$how'"
    else
        fail "$how app: localhost works after $BACK_MS ms, but not by one relay restart after 'app restarted'" "$(relay_state "$relay")"
    fi
    REJOIN+=("$how: relay started $gap ms after the app, localhost back after $BACK_MS ms")
}

app_restarts() { # app_restarts PROJECT: many-ports, its app restarted three ways; no manual step
    local project=$1 app relay output how
    log "app restarts (many-ports)"
    if ! compose_up "$project" many-ports; then
        fail "app restarts: compose up"
        return 0
    fi
    app=$(container "$project" app)
    relay=$(container "$project" relay)
    if ! start_host_services "$DOCKER0_IP" 3000 || ! wait_for_relay "$relay" || ! wait_for_localhost "$app" 3000 "$(now_ms)" 10000; then
        fail "app restarts: first round trip through localhost:3000" "$(relay_state "$relay")"
        return 0
    fi
    for how in "docker restart" "kill -9" "docker stop, start"; do
        app_restart_case "$how" "$app" "$relay"
    done
    if output=$(run_client "$app" 4:3000:3000 6:3000:3000 2>&1); then
        pass "app restarts: echo and half-close through localhost over 127.0.0.1 and ::1 after the restarts"
    else
        fail "app restarts: round trips after the restarts" "$output
$(relay_state "$relay")"
    fi
    # Removed, the app cannot be followed (Docker cannot start the relay in a container that is gone): the
    # relay must say how to fix it, in its log and its /readyz, and keep running.
    docker rm -f "$app" > /dev/null
    # shellcheck disable=SC2015 # `|| true` is meant for either step failing: the check below reads $output
    output=$(wait_for_log "$relay" "app container removed" 10 && timeout 20 docker exec "$relay" relay healthcheck 2>&1 || true)
    if [ "$(docker inspect -f '{{.State.Running}}' "$relay")" = true ] && [[ $output == *"up -d --force-recreate relay"* ]]; then
        pass "app removed: the relay keeps running, logs and reports the fix: ${output:0:60}..."
    else
        fail "app removed: relay running, 'app container removed' logged, /readyz naming the fix" "$output
$(relay_state "$relay")"
    fi
    recreate_fixes "$project"
    compose_down "$project"
    stop_pid "${BG_PIDS[-1]}" 5
}

# The app was recreated (`up -d` after the removal, as a user's change to the app does): which Compose
# command brings the app's localhost back. The relay's hint (`up -d --force-recreate relay`) must; the
# others are reported with this Compose's version (issue 19: --always-recreate-deps did nothing on 1.29).
recreate_fixes() {
    local project=$1 app step
    for step in "up -d" "up -d --always-recreate-deps"; do
        # shellcheck disable=SC2086 # $step is a list of arguments
        compose "$project" $step >> "$RUN/$project.recreate.log" 2>&1
        app=$(container "$project" app)
        if wait_for_localhost "$app" 3000 "$(now_ms)" 8000; then
            echo "compose-fix: ${COMPOSE[*]} $COMPOSE_VERSION, app recreated: '$step' brought localhost back"
        else
            echo "compose-fix: ${COMPOSE[*]} $COMPOSE_VERSION, app recreated: '$step' did not bring localhost back"
        fi
    done
    # (Compose 1.29 recreates the app too here: `up SERVICE` brings its dependencies up, forced as well.)
    compose "$project" up -d --force-recreate relay >> "$RUN/$project.recreate.log" 2>&1
    app=$(container "$project" app)
    if wait_for_localhost "$app" 3000 "$(now_ms)" 8000; then
        pass "app recreated: the relay's fix '${COMPOSE[*]} up -d --force-recreate relay' brings localhost back in $BACK_MS ms (Compose $COMPOSE_VERSION)"
    else
        fail "app recreated: '${COMPOSE[*]} up -d --force-recreate relay' did not bring localhost back" \
            "$(tail -20 "$RUN/$project.recreate.log")"
    fi
}

host_socket() { # host_socket PROJECT: a host service on 127.0.0.1 and a socket file only, reached via the file
    local project=$1 dir=$RUN/host-socket app relay output
    log "example host-socket"
    mkdir -m 0755 "$dir"
    sed "s|@SOCKET_DIR@|$dir|" "$HERE/override-host-socket.yaml" > "$RUN/host-socket.override.in.yaml"
    printf '%s\n' "routes:" "  - {name: app-socket, listen: 'unix:/shared/.s.PGSQL.5432', mode: '0666'," \
        "     target: 'unix:/host/postgresql/.s.PGSQL.5432'}" > "$dir/relay.yaml"
    # 127.0.0.1 only (a container cannot reach it), plus PostgreSQL's socket file name answering as 5432.
    if ! start_host_services 127.0.0.1 15432 "unix:$dir/.s.PGSQL.5432:5432"; then
        fail "host-socket: host service on 127.0.0.1 and $dir/.s.PGSQL.5432"
        return 0
    fi
    if ! compose_up "$project" host-socket "$RUN/host-socket.override.in.yaml"; then
        fail "host-socket: compose up"
        return 0
    fi
    app=$(container "$project" app)
    relay=$(container "$project" relay)
    if wait_for_relay "$relay" && wait_for_log "$relay" "target: unix:/host/postgresql/.s.PGSQL.5432 (socket file)" 10; then
        pass "host-socket: relay ready, its target the socket file in the read-only mount"
    else
        fail "host-socket: relay ready with the socket file target" "$(relay_logs "$relay")"
    fi
    if output=$(run_client "$app" 4:5432:5432 6:5432:5432 s:/shared/.s.PGSQL.5432:5432 2>&1); then
        pass "host-socket: echo and half-close through the app's localhost:5432 (127.0.0.1 and ::1) to a host socket file, and through the relay's socket file in a shared volume (read-only root, uid 10001)"
    else
        fail "host-socket: round trip via localhost:5432 to the socket file" "$output
relay log:
$(relay_logs "$relay")"
    fi
    if check_stop "$relay" && [ -S "$dir/.s.PGSQL.5432" ] && docker exec "$app" test ! -e /shared/.s.PGSQL.5432; then
        pass "host-socket: docker stop of the relay: $STOP_DETAIL; its own socket file removed, the host's untouched"
    else
        fail "host-socket: docker stop ($STOP_DETAIL), the relay's socket file removed, the host's still there" "$(relay_logs "$relay")"
    fi
    compose_down "$project"
    stop_pid "${BG_PIDS[-1]}" 5
}

holder_layout() { # holder_layout PROJECT: app and relay in a holder's namespace; the relay never restarts
    local project=$1 app relay relay_started t0
    log "example holder"
    if ! compose_up "$project" holder "$HERE/override-holder.yaml"; then
        fail "holder: compose up"
        return 0
    fi
    app=$(container "$project" app)
    relay=$(container "$project" relay)
    if ! start_host_services "$DOCKER0_IP" 8000 || ! wait_for_relay "$relay" || ! wait_for_localhost "$app" 8000 "$(now_ms)" 10000; then
        fail "holder: first round trip through localhost:8000" "$(relay_state "$relay")"
        return 0
    fi
    relay_started=$(docker inspect -f '{{.State.StartedAt}}' "$relay")
    docker restart -t 1 "$app" > /dev/null
    t0=$(now_ms)
    if wait_for_localhost "$app" 8000 "$t0" 8000 &&
        [ "$(docker inspect -f '{{.State.StartedAt}} {{.RestartCount}}' "$relay")" = "$relay_started 0" ]; then
        pass "holder: after 'docker restart app' localhost:8000 works at once ($BACK_MS ms), the relay never restarted"
    else
        fail "holder: app restart, relay untouched and localhost:8000 working ($BACK_MS ms)" "$(relay_state "$relay")"
    fi
    compose_down "$project"
    stop_pid "${BG_PIDS[-1]}" 5
}

# Run in a client container: `docker-host:PORT` by name, a TCP echo and a UDP datagram answered by the
# host service behind the relay (host_services.py: `E` echoes; a datagram comes back as `PORT data`).
BY_NAME='import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
tcp = socket.create_connection((name, port), timeout=10)
tcp.sendall(b"E" + b"x" * 4096)
got = b""
while len(got) < 4096:
    data = tcp.recv(65536)
    assert data, "closed after %d bytes" % len(got)
    got += data
assert got == b"x" * 4096, got[:40]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(10)
udp.sendto(b"ping", (name, port))
reply = udp.recv(65536)
assert reply == b"%d ping" % port, reply
print("ok tcp and udp via", name, port)'

docker_host_layout() { # docker_host_layout NAME: the relay configured the docker-host way, reached by name
    local net=$1 relay=$1-docker-host output
    log "docker-host layout"
    if ! start_host_services "$DOCKER0_IP" 2323; then
        fail "docker-host: host services on $DOCKER0_IP"
        return 0
    fi
    docker network create "$net" > /dev/null
    # As qoomon/docker-host's README runs it, without NET_ADMIN/NET_RAW: PORTS only, a name on the network.
    docker run -d --name "$relay" --network "$net" --network-alias docker-host --read-only --cap-drop ALL \
        --add-host host.docker.internal:host-gateway -e PORTS=2323 "$RELAY_IMAGE" > /dev/null
    if wait_for_relay "$relay" && wait_for_log "$relay" "configured the docker-host way" 1 &&
        wait_for_log "$relay" "every container on this container's networks can reach" 1; then
        pass "docker-host: PORTS alone: the relay says it is configured the docker-host way, and what that exposes"
    else
        fail "docker-host: relay ready with the docker-host layout lines" "$(relay_logs "$relay")"
    fi
    if output=$(timeout 60 docker run --rm --network "$net" "$BASE_IMAGE" python3 -c "$BY_NAME" docker-host 2323 2>&1); then
        pass "docker-host: another container reaches docker-host:2323 by name, TCP and UDP, to the host's port"
    else
        fail "docker-host: docker-host:2323 by name from another container, TCP and UDP" "$output
relay log:
$(relay_logs "$relay")"
    fi
    docker rm -f "$relay" > /dev/null 2>&1 || true
    docker network rm "$net" > /dev/null 2>&1 || true
    stop_pid "${BG_PIDS[-1]}" 5
}

# ---------------------------------------------------------------------------------------------------
# arm64 (issue 19): the image built for linux/arm64 on an arm64 base and run under qemu-user emulation

BINFMT_MOUNTED=0
BINFMT_ENABLED=0

emulation() { # can this machine run arm64 binaries? Sets EMULATION_WHY when not.
    [ "$(dpkg --print-architecture)" = arm64 ] && return 0
    if [ ! -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] && ! command -v qemu-aarch64-static > /dev/null; then
        EMULATION_WHY="qemu-user-static is not installed"
        return 1
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        if ! mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2> /dev/null; then
            EMULATION_WHY="binfmt_misc cannot be mounted (not in this kernel, or no privilege)"
            return 1
        fi
        BINFMT_MOUNTED=1
    fi
    if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2> /dev/null; then
        update-binfmts --enable qemu-aarch64 > /dev/null 2>&1 && BINFMT_ENABLED=1
    fi
    if ! grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 2> /dev/null; then
        EMULATION_WHY="no qemu-aarch64 binfmt handler with the F flag (update-binfmts --enable qemu-aarch64)"
        return 1
    fi
}

restore_binfmt() { # leave binfmt_misc as the run found it
    [ "$BINFMT_ENABLED" = 1 ] && update-binfmts --disable qemu-aarch64 > /dev/null 2>&1
    [ "$BINFMT_MOUNTED" = 1 ] && umount /proc/sys/fs/binfmt_misc 2> /dev/null
    BINFMT_ENABLED=0 BINFMT_MOUNTED=0
}

# build_arm64 BASE: the Dockerfile for linux/arm64 with the classic builder. Docker 20.10's classic builder
# labels every image it commits during a --platform build with the engine's own platform, so the final
# stage's `COPY --from=builder` refuses the builder ("does not match the specified platform"). So: the
# builder stage (--target builder) as written; its /rootfs imported as a linux/arm64 image; then the
# Dockerfile's final stage as written, from that image instead of `scratch` + the COPY.
build_arm64() {
    local base=$1 cid root=$RUN/rootfs-arm64-image
    build_image relay-sidecar:docker-test-arm64-builder "$base" linux/arm64 --target builder || return 1
    mkdir "$root"
    cid=$(docker create relay-sidecar:docker-test-arm64-builder 2> /dev/null)
    docker export "$cid" | tar -x -C "$root" rootfs
    docker rm "$cid" > /dev/null
    tar --numeric-owner -C "$root/rootfs" -c . | docker import --platform linux/arm64 - relay-rootfs:docker-test-arm64 > /dev/null
    rm -rf "$root"
    awk 'BEGIN { print "FROM relay-rootfs:docker-test-arm64" }
        /^FROM scratch$/ { final = 1; next }
        final && /^COPY --from=builder \/rootfs \/$/ { next }
        final { print }' "$CONTEXT/Dockerfile" > "$CONTEXT/Dockerfile.arm64-final"
    build_image relay-sidecar:docker-test-arm64 "$base" linux/arm64 -f "$CONTEXT/Dockerfile.arm64-final"
}

arm64() { # the core of this test on the arm64 image: echo, half-close, /readyz, an app restart
    local t0 amd_base=$BASE_IMAGE arm_base app relay output arch
    if [ -n "${RELAY_SKIP_ARM64:-}" ]; then
        echo "SKIP arm64: RELAY_SKIP_ARM64 is set"
        return 0
    fi
    if ! emulation; then
        echo "SKIP arm64: cannot run arm64 binaries here: $EMULATION_WHY"
        return 0
    fi
    log "arm64 under emulation"
    t0=$(now_ms)
    if ! base_image arm64; then
        fail "arm64: debootstrap --arch=arm64 base"
        BASE_IMAGE=$amd_base
        return 0
    fi
    arm_base=$BASE_IMAGE
    BASE_IMAGE=$amd_base
    if ! build_arm64 "$arm_base"; then
        fail "arm64: docker build --platform linux/arm64" "$(tail -30 "$RUN/build-docker-test-arm64.log")"
        return 0
    fi
    # (The classic builder labels the images it commits with the engine's platform: ask the binaries.)
    arch=$(timeout 60 docker run --rm --network none --entrypoint python3 relay-sidecar:docker-test-arm64 \
        -c 'import platform; print(platform.machine())' 2>&1)
    if [ "$arch" = aarch64 ]; then
        pass "arm64: offline docker build --platform linux/arm64 on an arm64 base ($((($(now_ms) - t0) / 1000)) s with the base)"
    else
        fail "arm64: the image's python runs as aarch64" "$arch"
        return 0
    fi
    # The app (native) and the relay (arm64, emulated) in its namespace, as with network_mode: service:app.
    start_host_services "$DOCKER0_IP" 3000 || { fail "arm64: host service on $DOCKER0_IP"; return 0; }
    app=$(docker run -d --name "relaytest$$-arm-app" --sysctl net.ipv6.conf.all.disable_ipv6=0 "$BASE_IMAGE" sleep infinity)
    relay=$(docker run -d --name "relaytest$$-arm-relay" --network "container:$app" \
        --restart unless-stopped --read-only --cap-drop ALL -e RELAY_PORTS=3000 -e "RELAY_TARGET=$DOCKER0_IP" \
        relay-sidecar:docker-test-arm64)
    if ! wait_for_relay "$relay" || ! wait_for_localhost "$app" 3000 "$(now_ms)" 20000; then
        fail "arm64: relay ready and a first round trip" "$(relay_state "$relay")"
    else
        if output=$(run_client "$app" 4:3000:3000 6:3000:3000 2>&1); then
            pass "arm64: echo and half-close through the app's localhost (127.0.0.1, ::1) to the relay on aarch64"
        else
            fail "arm64: echo and half-close" "$output
$(relay_logs "$relay")"
        fi
        if output=$(timeout 60 docker exec "$relay" relay healthcheck 2>&1); then
            pass "arm64: /readyz through relay healthcheck: ${output:0:40}..."
        else
            fail "arm64: relay healthcheck" "$output"
        fi
        app_restart_case "docker restart" "$app" "$relay"
    fi
    docker rm -f "$relay" "$app" > /dev/null
    stop_pid "${BG_PIDS[-1]}" 5
    ARM64_SECONDS=$((($(now_ms) - t0) / 1000))
    echo "arm64: built and tested in $ARM64_SECONDS s"
}

# ---------------------------------------------------------------------------------------------------

main() {
    install_missing
    # One run at a time: runs share docker0 and the cache. Nothing started below inherits the lock (9>&-),
    # so an engine that outlived an aborted run does not hold it; the stale-run cleanup stops that one.
    exec 9> "$LOCK_FILE"
    if ! flock -w 300 9; then
        echo "another Docker engine test holds $LOCK_FILE" >&2
        return 1
    fi
    local dir
    for dir in "$RUN_PREFIX"*; do # folders of aborted runs: stop their engine, unmount, remove
        if [ -d "$dir" ]; then clean_run_dir "$dir"; fi
    done
    delete_engine_links # and their compose networks' bridges
    RUN=$(mktemp -d "${RUN_PREFIX}XXXXXX")
    PY=$REPO/.venv/bin/python
    [ -x "$PY" ] || PY=/usr/bin/python3
    pick_compose
    log "compose: ${COMPOSE[*]} $COMPOSE_VERSION"

    start_dockerd
    base_image
    VERSION=$(project_version)
    if ! build_context; then
        fail "image: build context with wheels (scripts/fetch-wheels)"
        return 0
    fi
    RELAY_IMAGE="relay-sidecar:docker-test"
    if build_image "$RELAY_IMAGE" "$BASE_IMAGE"; then
        pass "image: offline docker build (--network none, wheels/, BASE_IMAGE=$BASE_IMAGE loaded from a tar)"
        report_size
    else
        fail "image: docker build" "$(tail -30 "$RUN/build-docker-test.log")"
        return 0
    fi
    local detail
    if detail=$(check_image_config); then
        pass "image: user 10001, ENTRYPOINT [relay], STOPSIGNAL SIGTERM, OCI labels, version $VERSION"
    else
        fail "image: config" "$detail"
    fi
    if detail=$(check_image_contents); then
        pass "image: no shell, package manager or pip in it (docker export; --entrypoint sh fails)"
    else
        fail "image: distroless" "$detail"
    fi
    if detail=$(timeout 30 docker run --rm --read-only --cap-drop ALL --network none "$RELAY_IMAGE" --help 2>&1); then
        pass "image: relay --help runs with a read-only root, no capabilities, no network"
    else
        fail "image: relay --help with a read-only root and no capabilities" "$detail"
    fi
    offline_failure
    exercise_image
    memory_limit

    start_dns
    example socat-dropin "relaytest$$a" gateway "8000" 4:8000:8000 6:8000:8000
    example many-ports "relaytest$$b" docker0 "3000 5433 8000 8001 8002 8125" \
        4:3000:3000 6:3000:3000 4:8000:8000 6:8000:8000 4:8001:8001 6:8001:8001 4:8002:8002 6:8002:8002 \
        4:5432:5433 6:5432:5433 u4:8125:8125 u6:8125:8125
    app_restarts "relaytest$$c"
    holder_layout "relaytest$$d"
    host_socket "relaytest$$e"
    docker_host_layout "relaytest$$f"
    arm64
    local line
    for line in "${REJOIN[@]}"; do echo "rejoin: $line"; done
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main
