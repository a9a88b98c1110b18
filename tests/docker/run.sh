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

build_image() {
    local version arg
    local -a args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
    version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
    args+=(--build-arg "VERSION=$version")
    for arg in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        if [ -n "${!arg:-}" ]; then args+=(--build-arg "$arg=${!arg}"); fi
    done
    RELAY_IMAGE="relay-sidecar:docker-test"
    log "docker build (BASE_IMAGE=$BASE_IMAGE)"
    DOCKER_BUILDKIT=0 timeout 300 docker build -q "${args[@]}" -t "$RELAY_IMAGE" "$REPO" > "$RUN/build.log" 2>&1
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
}

report_size() {
    local total base
    total=$(docker image inspect -f '{{.Size}}' "$RELAY_IMAGE")
    base=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")
    echo "image size: $((total / 1000000)) MB = base $((base / 1000000)) MB + relay $(((total - base) / 1000000)) MB" \
        "($(((total - base) / 1000)) kB)"
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
    if [ "$(docker inspect -f '{{.State.Running}}' "$relay")" = true ] && [[ $output == *"--always-recreate-deps"* ]]; then
        pass "app removed: the relay keeps running, logs and reports the fix: ${output:0:60}..."
    else
        fail "app removed: relay running, 'app container removed' logged, /readyz naming the fix" "$output
$(relay_state "$relay")"
    fi
    compose_down "$project"
    stop_pid "${BG_PIDS[-1]}" 5
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
    if build_image; then
        pass "image: docker build with BASE_IMAGE=$BASE_IMAGE"
        report_size
    else
        fail "image: docker build" "$(tail -30 "$RUN/build.log")"
        return 0
    fi
    local detail
    if detail=$(check_image_config); then
        pass "image: user 10001, ENTRYPOINT [relay], STOPSIGNAL SIGTERM, OCI labels"
    else
        fail "image: config" "$detail"
    fi
    if detail=$(timeout 30 docker run --rm --read-only --cap-drop ALL --network none "$RELAY_IMAGE" --help 2>&1); then
        pass "image: relay --help runs with a read-only root, no capabilities, no network"
    else
        fail "image: relay --help with a read-only root and no capabilities" "$detail"
    fi

    start_dns
    example socat-dropin "relaytest$$a" gateway "8000" 4:8000:8000 6:8000:8000
    example many-ports "relaytest$$b" docker0 "3000 5433 8000 8001 8002 8125" \
        4:3000:3000 6:3000:3000 4:8000:8000 6:8000:8000 4:8001:8001 6:8001:8001 4:8002:8002 6:8002:8002 \
        4:5432:5433 6:5432:5433 u4:8125:8125 u6:8125:8125
    app_restarts "relaytest$$c"
    holder_layout "relaytest$$d"
    host_socket "relaytest$$e"
    local line
    for line in "${REJOIN[@]}"; do echo "rejoin: $line"; done
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main
