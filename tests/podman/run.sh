#!/usr/bin/env bash
# The Podman engine test of relay-sidecar: the image built by Podman, and the sidecar topology run by
# Podman as a pod, with `--network container:<app>` and through podman-compose. Linux, as root. Run by scripts/podman-test;
# prints `podman: N passed, M failed` last and exits non-zero when anything failed.
#
# Steps:
#  1. Install what is missing from Debian's packages (podman, catatonit: the pod's pause image is built
#     from it; debootstrap for a base image not yet cached).
#  2. A private configuration under a run folder in /tmp (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF,
#     CONTAINERS_REGISTRIES_CONF): own graphroot/runroot/tmp/network config, cgroupfs, file events,
#     default_ulimits (without them runc fails `error setting rlimit type 7` in this sandbox), no search
#     registries; nothing is pulled (--pull=never).
#  3. Base image: the Docker test's cached debootstrap tar (tests/docker/run.sh builds and caches it; its
#     functions are read from that file, with `docker` meaning `podman`, so a missing cache is built
#     the same way), then `podman build --format docker --network host` (the docker format keeps the
#     HEALTHCHECK; the host network needs no container network, so no firewall rule).
#  4. The topology runs in a network namespace of its own (`ip netns add`, entered with nsenter, which
#     changes nothing else): the CNI bridge, its firewall rules and the "host" services
#     (tests/docker/host_services.py on 0.0.0.0) all live there, so the host's firewall is never
#     written. For each layout (a pod; --network container:app; tests/podman/compose.yaml through PyPI's
#     podman-compose, installed into the run's own venv): the relay logs ready and that it uses
#     host.containers.internal (Debian's Podman 4.3 has no host.docker.internal), `podman healthcheck run`
#     (the image's HEALTHCHECK) passes, `relay healthcheck` (/readyz) answers, /metrics answers on the
#     app's address port 9464 (where compose-examples/prometheus scrapes it), the app's echo and
#     half-close through localhost over 127.0.0.1 and ::1 reach the host (tests/docker/app_client.py),
#     and `podman stop` of the relay takes well under a second with exit code 0.
#  5. On exit, whatever happened: containers, pods and the network removed, processes of the run stopped,
#     the namespace deleted, cgroups (libpod_parent), CNI IPAM state, runc state, mounts and the run
#     folder removed; then a check that no firewall rule, mount, bridge, namespace or cgroup is left.
#     A run also clears what an aborted earlier run left.
#
# Environment: RELAY_TEST_CACHE (default /var/cache/relay-sidecar), RELAY_PODMAN_SUBNET (the bridge
# inside the test's namespace, default 10.89.213.0/24; its .1 is the host side).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/tests/podman
DOCKER_HERE=$REPO/tests/docker
# shellcheck source=tests/engine-lib.sh
. "$REPO/tests/engine-lib.sh"
CACHE_DIR=${RELAY_TEST_CACHE:-/var/cache/relay-sidecar} # read by base_image
export CACHE_DIR
SUBNET=${RELAY_PODMAN_SUBNET:-10.89.213.0/24}
GATEWAY=${SUBNET%.*}.1
NAME="relay-podman-test" # the namespace, the network, and the prefix of containers and pods
RUN_PREFIX=/tmp/relay-podman-test.
LOCK_FILE=/run/lock/relay-podman-test.lock
STOP_LIMIT_MS=1000

passed=0
failed=0
RUN_STARTED=$(date +%s)
RUN=""
BG_PIDS=()
FIREWALL_BEFORE=""
NETNS_BEFORE=""
CNI_STATE=/var/lib/cni/networks/$NAME
RUN_CONTAINERS_EXISTED=0
LIBPOD_CGROUPS_EXISTED=0

if [ "$(uname -s)" != Linux ] || [ "$(id -u)" -ne 0 ]; then
    echo "podman: skipped: the Podman engine test needs root on Linux"
    exit 0
fi

# Shared with the Docker test (tests/engine-lib.sh): reporting, process helpers and the base image.
# Here `docker` is podman: load, import -c, save -o and image inspect take the same arguments.
docker() { podman "$@"; }

install_missing() {
    local -a want=()
    command -v podman > /dev/null || want+=(podman)
    command -v runc > /dev/null || want+=(runc)
    [ -x /usr/libexec/podman/catatonit ] || command -v catatonit > /dev/null || want+=(catatonit)
    command -v debootstrap > /dev/null || want+=(debootstrap)
    command -v nsenter > /dev/null || want+=(util-linux)
    command -v ip > /dev/null || want+=(iproute2)
    command -v pgrep > /dev/null || want+=(procps)
    apt_install "${want[@]}"
}

# ---------------------------------------------------------------------------------------------------
# Private configuration: every path Podman writes to is under $RUN, except what its tools keep in fixed
# places (CNI IPAM state, runc state, cgroups, podman's netns files), which the cleanup removes.

configure() {
    mkdir -p "$RUN/conf" "$RUN/tmp" "$RUN/cni"
    cat > "$RUN/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
# runc, not Debian's default crun: crun 1.8 refuses a host with cgroup v1 controllers and a cgroup2
# mount beside them ("cgroups in hybrid mode not supported"), as this CI machine has; runc runs there.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUN/events.log"
tmp_dir = "$RUN/tmp"
static_dir = "$RUN/storage/libpod"
volume_path = "$RUN/storage/volumes"

[network]
network_config_dir = "$RUN/cni"
EOF
    cat > "$RUN/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$RUN/storage"
runroot = "$RUN/runroot"
EOF
    echo 'unqualified-search-registries = []' > "$RUN/conf/registries.conf"
    export CONTAINERS_CONF=$RUN/conf/containers.conf
    export CONTAINERS_STORAGE_CONF=$RUN/conf/storage.conf
    export CONTAINERS_REGISTRIES_CONF=$RUN/conf/registries.conf
}

# Nothing the test starts inherits the lock (fd 9): podman leaves conmon running, which would hold it.
podman() { command podman "$@" 9>&-; }
inns() { nsenter --net="/run/netns/$NAME" "$@" 9>&-; } # run in the test's network namespace
inns_t() { # inns_t SECONDS COMMAND...: the same, bounded in time
    local limit=$1
    shift
    timeout "$limit" nsenter --net="/run/netns/$NAME" "$@" 9>&-
}

# ---------------------------------------------------------------------------------------------------
# Cleanup

container_ids() { # the containers of the run folder $1, from its storage
    local id
    for id in "$1"/storage/overlay-containers/*; do
        id=${id##*/}
        if [[ $id =~ ^[0-9a-f]{64}$ ]]; then echo "$id"; fi
    done
}

container_cgroups() { # cgroup folders of the containers of run folder $1 (cgroupfs: libpod_parent/libpod-ID)
    local id
    for id in $(container_ids "$1"); do
        compgen -G "/sys/fs/cgroup/*/libpod_parent/libpod-$id" || true
        compgen -G "/sys/fs/cgroup/libpod_parent/libpod-$id" || true
        compgen -G "/sys/fs/cgroup/*/libpod_parent/libpod-$id/*/" || true
    done
}

engine_cgroups() { # libpod_parent (cgroupfs' parent of conmon, pods and containers) and below, deepest first
    find /sys/fs/cgroup -maxdepth 5 -type d -path '*/libpod_parent*' 2> /dev/null | sort -r
}

other_podman_running() { # a live conmon of some other run (not under $1) on this machine. An exited one
    # (a zombie nobody has reaped yet: its command line reads empty) is nobody's: counting it as another
    # run's kept this run's libpod_parent cgroups in place.
    local pid cmdline
    for pid in $(pgrep -x conmon || true); do
        alive "$pid" || continue
        cmdline=$(tr '\0' ' ' 2> /dev/null < "/proc/$pid/cmdline")
        if [ -n "$cmdline" ] && [[ "$cmdline" != *"$1/"* ]]; then
            log "conmon $pid belongs to another run: $cmdline"
            return 0
        fi
    done
    return 1
}

clean_run_dir() { # everything the run folder $1 left, whether or not its script is still around
    local dir=$1 id pid cgroup mnt i
    if [ -f "$dir/conf/containers.conf" ]; then
        local CONTAINERS_CONF=$dir/conf/containers.conf CONTAINERS_STORAGE_CONF=$dir/conf/storage.conf
        local CONTAINERS_REGISTRIES_CONF=$dir/conf/registries.conf
        export CONTAINERS_CONF CONTAINERS_STORAGE_CONF CONTAINERS_REGISTRIES_CONF
        if [ -e "/run/netns/$NAME" ]; then # CNI's teardown in the namespace the network lives in
            # A container that others joined goes only after them: a few passes.
            inns_t 60 podman pod rm -f -t 1 -a > /dev/null 2>&1 || true
            for i in 1 2 3; do
                [ -z "$(podman ps -aq 2> /dev/null)" ] && break
                inns_t 60 podman rm -f -t 1 -a > /dev/null 2>&1 || true
            done
            inns_t 60 podman network rm -f "$NAME" > /dev/null 2>&1 || true
        fi
    fi
    # Whatever is still running: container processes by their cgroups, conmon and the rest by the folder.
    for cgroup in $(container_cgroups "$dir"); do
        while read -r pid; do kill -KILL "$pid" 2> /dev/null || true; done < <(cat "$cgroup/cgroup.procs" 2> /dev/null)
    done
    for pid in $(pids_using "$dir"); do stop_pid "$pid" 5; done
    for ((i = 0; i < 50; i++)); do
        cgroup=$(container_cgroups "$dir" | sort -r)
        [ -z "$cgroup" ] && break
        # shellcheck disable=SC2086 # a list of paths without spaces
        rmdir $cgroup 2> /dev/null || sleep 0.1
    done
    for id in $(container_ids "$dir"); do rm -rf "/run/runc/$id"; done
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r mnt; do
        umount -l "$mnt" 2> /dev/null || true
    done
    rm -rf "$dir"
}

pids_in_netns() { # every process in the test's network namespace: all of them the test's own
    local ns pid
    ns=$(stat -L -c %i "/run/netns/$NAME" 2> /dev/null) || return 0
    for pid in /proc/[0-9]*; do
        if [ "$(stat -L -c %i "$pid/ns/net" 2> /dev/null)" = "$ns" ]; then echo "${pid#/proc/}"; fi
    done
}

clean_shared_state() { # what lives outside any run folder: the namespace, CNI IPAM state, empty cgroups
    local ns pid
    if [ -e "/run/netns/$NAME" ]; then
        for pid in $(pids_in_netns); do stop_pid "$pid" 5; done
        ip netns delete "$NAME" 2> /dev/null || true
    fi
    rm -rf "$CNI_STATE"
    if [ "$LIBPOD_CGROUPS_EXISTED" = 0 ] && ! other_podman_running "${RUN:-/nonexistent}"; then
        remove_cgroups engine_cgroups
    fi
    if [ "$RUN_CONTAINERS_EXISTED" = 0 ] && [ -d /run/containers ] && ! other_podman_running "${RUN:-/nonexistent}"; then
        rm -rf /run/containers
    fi
    # Network namespace files podman made for our containers (netns-<uuid>), once nothing uses them.
    for ns in $(new_podman_netns); do
        umount "/run/netns/$ns" 2> /dev/null || true
        rm -f "/run/netns/$ns"
    done
}

new_podman_netns() { # podman's netns-<uuid> files that were not there when the run started
    local ns
    for ns in /run/netns/netns-*; do
        [ -e "$ns" ] || continue
        if [[ " $NETNS_BEFORE " != *" ${ns##*/} "* ]]; then printf '%s ' "${ns##*/}"; fi
    done
}

podman_netns() { # podman's netns-<uuid> files now (other tests' namespaces come and go: not compared)
    local ns
    for ns in /run/netns/netns-*; do
        if [ -e "$ns" ]; then printf '%s ' "${ns##*/}"; fi
    done
}

cleanup() {
    local status=$? pid leftovers="" checked=""
    trap - EXIT INT TERM
    set +e
    log "cleaning up"
    for pid in "${BG_PIDS[@]}"; do stop_pid "$pid" 5; done
    if [ -n "$RUN" ]; then clean_run_dir "$RUN"; fi
    clean_shared_state
    if [ -n "$RUN" ]; then
        grep -qF "$RUN" /proc/self/mountinfo && leftovers+="mounts under $RUN; "
        [ -e "$RUN" ] && leftovers+="$RUN; "
        [ -n "$(pids_using "$RUN")" ] && leftovers+="processes of $RUN; "
        [ -e "/run/netns/$NAME" ] && leftovers+="network namespace $NAME; "
        pgrep -f "$DOCKER_HERE/host_services.py 0.0.0.0" > /dev/null && leftovers+="host services; "
        [ -n "$(new_podman_netns)" ] && leftovers+="podman's network namespaces $(new_podman_netns); "
        [ -e "$CNI_STATE" ] && leftovers+="$CNI_STATE; "
        ip -o link show | grep -q 'cni-podman' && leftovers+="a cni-podman bridge in the host namespace; "
        [ "$LIBPOD_CGROUPS_EXISTED" = 0 ] && [ -n "$(engine_cgroups)" ] && leftovers+="libpod_parent cgroups; "
        [ "$RUN_CONTAINERS_EXISTED" = 0 ] && [ -e /run/containers ] && leftovers+="/run/containers; "
        [ "$(firewall_rules)" != "$FIREWALL_BEFORE" ] && leftovers+="firewall rules changed; "
        checked="no container, pod, network, namespace, mount, cgroup, CNI state or firewall rule left behind"
    fi
    finish podman "$checked" "$leftovers" "$status"
}

# ---------------------------------------------------------------------------------------------------
# The image

build_image() {
    local version arg
    local -a args=(--format docker --network host --pull=never --build-arg "BASE_IMAGE=$BASE_IMAGE")
    version=$(project_version)
    args+=(--build-arg "VERSION=$version")
    for arg in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        if [ -n "${!arg:-}" ]; then args+=(--build-arg "$arg=${!arg}"); fi
    done
    RELAY_IMAGE=localhost/relay-sidecar:podman-test
    log "podman build --format docker (BASE_IMAGE=$BASE_IMAGE)"
    timeout 300 podman build -q "${args[@]}" -t "$RELAY_IMAGE" "$REPO" > "$RUN/build.log" 2>&1
}

check_image_config() {
    local got want
    got=$(podman image inspect -f '{{.Config.User}}|{{json .Config.Entrypoint}}|{{.Config.StopSignal}}|{{json .Config.Healthcheck.Test}}' "$RELAY_IMAGE")
    want='10001:10001|["relay"]|SIGTERM|["CMD","python","-I","-m","relay.probe"]'
    [ "$got" = "$want" ] || { echo "user|entrypoint|stopsignal|healthcheck: $got, expected $want"; return 1; }
}

# ---------------------------------------------------------------------------------------------------
# The topology

# PyPI's podman-compose (1.6 or newer runs network_mode "service:app"; Debian's 1.0.3 does not), in a venv
# of the run's own, made by this project's venv's pip.
install_compose() {
    local venv=$RUN/compose-venv
    COMPOSE=$venv/bin/podman-compose
    "$PY" -m venv --without-pip "$venv" &&
        timeout 120 "$PY" -m pip --python "$venv/bin/python" install -q --disable-pip-version-check \
            'podman-compose>=1.6' > "$RUN/compose-install.log" 2>&1 &&
        log "$("$COMPOSE" --version 2> /dev/null | head -1)"
}

wait_for_log() { # wait_for_log CONTAINER TEXT SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        [[ "$(podman logs "$1" 2>&1)" == *"$2"* ]] && return 0
        [ "$(podman inspect -f '{{.State.Running}}' "$1" 2> /dev/null)" = true ] || break
        sleep 0.1
    done
    [[ "$(podman logs "$1" 2>&1)" == *"$2"* ]]
}

wait_for_line() { # wait_for_line FILE TEXT SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -qF -- "$2" "$1" 2> /dev/null && return 0
        sleep 0.1
    done
    return 1
}

relay_logs() { podman logs "$1" 2>&1 | tail -30; }

start_host_services() { # the "host" services in the test's namespace, on every address there
    local out=$RUN/services.log
    # nsenter itself (not the inns function, which would run in a subshell): $! is then the service.
    nsenter --net="/run/netns/$NAME" "$PY" "$DOCKER_HERE/host_services.py" 0.0.0.0 "$@" > "$out" 2>&1 9>&- &
    BG_PIDS+=($!)
    wait_for_line "$out" ready 10 || { cat "$out"; return 1; }
}

# The app: the base image waiting; --init so that podman stop does not wait 10 s for `sleep` (PID 1
# ignores SIGTERM). Its resolver is the bridge's host side, where nothing answers DNS: a name that is not
# in /etc/hosts fails at once, as on a host without a resolver for it.
RELAY_OPTS=(--read-only --cap-drop ALL --security-opt no-new-privileges --health-interval disable
    -e "RELAY_PORTS=8000 5432:5433")

start_layout() { # start_layout pod|container|compose APP RELAY (called in a condition: set -e is off here)
    if [ "$1" = compose ]; then
        RELAY_TEST_BASE_IMAGE=$BASE_IMAGE RELAY_TEST_IMAGE=$RELAY_IMAGE RELAY_TEST_DNS=$GATEWAY \
            inns_t 120 "$COMPOSE" -p "$NAME" -f "$HERE/compose.yaml" up -d || return 1
    elif [ "$1" = pod ]; then
        inns podman pod create --name "$NAME-pod" --network "$NAME" --dns "$GATEWAY" || return 1
        inns podman run -d --pull=never --pod "$NAME-pod" --name "$2" --init "$BASE_IMAGE" sleep infinity || return 1
        inns podman run -d --pull=never --pod "$NAME-pod" --name "$3" "${RELAY_OPTS[@]}" "$RELAY_IMAGE" || return 1
    else
        inns podman run -d --pull=never --name "$2" --network "$NAME" --dns "$GATEWAY" --init "$BASE_IMAGE" sleep infinity || return 1
        inns podman run -d --pull=never --name "$3" --network "container:$2" "${RELAY_OPTS[@]}" "$RELAY_IMAGE" || return 1
    fi
}

layout() { # layout pod|container|compose: the app and the relay sharing one network namespace, then checks
    local how=$1 app=$NAME-$1-app relay=$NAME-$1-relay output t0 t1 code address
    if [ "$how" = compose ]; then app=${NAME}_app_1 relay=${NAME}_relay_1; fi
    log "layout: $how"
    if ! start_layout "$how" "$app" "$relay" > "$RUN/$how.run.log" 2>&1; then
        fail "$how: podman pod create / run" "$(cat "$RUN/$how.run.log")"
        return 0
    fi
    log "$how: rules CNI wrote in the test's namespace: $(inns iptables-save 2> /dev/null | grep -c '^-A' || true); on the host: $(iptables-save 2> /dev/null | grep -c '^-A' || true)"
    if ! wait_for_log "$relay" "ready: relay" 20; then
        fail "$how: relay never logged ready" "$(relay_logs "$relay")"
        return 0
    fi
    if wait_for_log "$relay" "using host.containers.internal -> $GATEWAY" 15; then
        pass "$how: relay uses host.containers.internal -> $GATEWAY (Podman's name for the host)"
    else
        fail "$how: relay did not log 'using host.containers.internal -> $GATEWAY'" "$(relay_logs "$relay")"
    fi
    if output=$(inns_t 30 podman healthcheck run "$relay" 2>&1); then
        pass "$how: podman healthcheck run (the image's HEALTHCHECK, kept by --format docker): ${output:-healthy}"
    else
        fail "$how: podman healthcheck run" "$output"
    fi
    if output=$(inns_t 20 podman exec "$relay" relay healthcheck 2>&1); then
        pass "$how: relay healthcheck (/readyz) exits 0: ${output:0:40}..."
    else
        fail "$how: relay healthcheck inside the relay container" "$output"
    fi
    # What compose-examples/prometheus relies on: /metrics answers on the app's address, port 9464.
    address=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$app")
    if [ "$how" = pod ]; then
        address=$(podman inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(podman pod inspect -f '{{.InfraContainerID}}' "$NAME-pod")")
    fi
    if output=$(inns_t 20 "$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
        "http://$address:9464/metrics" 2>&1) && [[ $output == *relay_build_info* ]]; then
        pass "$how: /metrics answers on the app's address $address:9464 (where Prometheus scrapes it)"
    else
        fail "$how: /metrics on $address:9464" "${output:0:500}"
    fi
    if output=$(inns_t 90 podman exec -i "$app" python3 - 4:8000:8000 6:8000:8000 4:5432:5433 6:5432:5433 \
        < "$DOCKER_HERE/app_client.py" 2>&1); then
        pass "$how: echo and half-close through the app's localhost (127.0.0.1 and ::1, 8000 and 5432->5433) to the host"
    else
        fail "$how: round trip and half-close via localhost" "$output
relay log:
$(relay_logs "$relay")"
    fi
    t0=$(now_ms)
    inns podman stop -t 10 "$relay" > /dev/null 2>&1
    t1=$(now_ms)
    code=$(podman inspect -f '{{.State.ExitCode}}' "$relay")
    if [ $((t1 - t0)) -lt "$STOP_LIMIT_MS" ] && [ "$code" = 0 ]; then
        pass "$how: podman stop of the relay: $((t1 - t0)) ms, exit code $code"
    else
        fail "$how: podman stop of the relay: $((t1 - t0)) ms, exit code $code (limit $STOP_LIMIT_MS ms, exit 0)" "$(relay_logs "$relay")"
    fi
    inns podman rm -f -t 1 "$relay" > /dev/null 2>&1
    if [ "$how" = compose ]; then
        RELAY_TEST_BASE_IMAGE=$BASE_IMAGE RELAY_TEST_IMAGE=$RELAY_IMAGE RELAY_TEST_DNS=$GATEWAY \
            inns_t 120 "$COMPOSE" -p "$NAME" -f "$HERE/compose.yaml" down -t 1 > /dev/null 2>&1
    elif [ "$how" = pod ]; then
        inns podman pod rm -f -t 1 "$NAME-pod" > /dev/null 2>&1
    else
        inns podman rm -f -t 1 "$app" > /dev/null 2>&1
    fi
    if [ -z "$(podman ps -aq)" ] && [ -z "$(podman pod ps -q)" ]; then
        pass "$how: containers and pod removed"
    else
        fail "$how: containers or pods left" "$(podman ps -a; podman pod ps)"
    fi
}

main() {
    install_missing
    exec 9> "$LOCK_FILE"
    if ! flock -w 120 9; then
        echo "another Podman engine test holds $LOCK_FILE" >&2
        return 1
    fi
    local dir
    for dir in "$RUN_PREFIX"*; do # folders of aborted runs
        if [ -d "$dir" ]; then clean_run_dir "$dir"; fi
    done
    clean_shared_state
    [ -d /run/containers ] && RUN_CONTAINERS_EXISTED=1
    [ -n "$(engine_cgroups)" ] && LIBPOD_CGROUPS_EXISTED=1
    NETNS_BEFORE=$(podman_netns)
    FIREWALL_BEFORE=$(firewall_rules)
    RUN=$(mktemp -d "${RUN_PREFIX}XXXXXX")
    PY=$REPO/.venv/bin/python
    [ -x "$PY" ] || PY=/usr/bin/python3
    configure
    log "$(podman --version); storage, runroot and network config under $RUN"

    base_image "$(dpkg --print-architecture)"
    if build_image; then
        pass "image: podman build --format docker with BASE_IMAGE=$BASE_IMAGE"
    else
        fail "image: podman build" "$(tail -30 "$RUN/build.log")"
        return 0
    fi
    local detail
    if detail=$(check_image_config); then
        pass "image: user 10001, ENTRYPOINT [relay], STOPSIGNAL SIGTERM, HEALTHCHECK python -I -m relay.probe"
    else
        fail "image: config" "$detail"
    fi

    ip netns add "$NAME"
    inns ip link set lo up
    inns podman network create --subnet "$SUBNET" --gateway "$GATEWAY" "$NAME" > /dev/null
    start_host_services 8000 5433
    layout container
    layout pod
    if install_compose; then
        layout compose
    else
        echo "SKIP compose: podman-compose >= 1.6 could not be installed from the package index:"
        tail -3 "$RUN/compose-install.log" | sed 's/^/    /'
    fi
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main
