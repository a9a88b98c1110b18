# Functions the Docker and Podman engine tests share (sourced by tests/docker/run.sh and
# tests/podman/run.sh): reporting, process helpers, the firewall snapshot and the cached debootstrap base
# image. Definitions only; each caller sets RUN_STARTED, passed/failed, RUN and CACHE_DIR, and Podman's
# run.sh maps `docker` to podman (load, import -c, save -o and image inspect take the same arguments).
# shellcheck shell=bash

log() { printf '== [%3d s] %s\n' "$(($(date +%s) - RUN_STARTED))" "$*"; }

pass() { passed=$((passed + 1)); printf 'PASS %s\n' "$1"; }

fail() {
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$1"
    if [ $# -gt 1 ]; then printf '%s\n' "$2" | sed 's/^/    /'; fi
}

remove_cgroups() { # the cgroup folders that function $1 lists (deepest first), once they are empty. An
    # engine's last processes (conmon, a shim, a pod's infra) may still be exiting when the containers are
    # gone: kill what is left and retry, bounded to 5 s. Only for cgroups that are the run's own (the
    # caller checked that no other engine runs).
    local i cgroup pid
    for ((i = 0; i < 50; i++)); do
        [ -z "$("$1")" ] && return 0
        for cgroup in $("$1"); do
            while read -r pid; do kill -KILL "$pid" 2> /dev/null || true; done < <(cat "$cgroup/cgroup.procs" 2> /dev/null)
            rmdir "$cgroup" 2> /dev/null || true
        done
        [ -n "$("$1")" ] && sleep 0.1
    done
}

finish() { # the run's verdict, then its exit: $1 engine name, $2 what the cleanup checked, $3 what it
    # found left behind (empty: nothing), $4 the status the run stopped with. Called from an EXIT trap.
    if [ -n "$3" ]; then fail "cleanup: left behind: $3"; elif [ -n "$2" ]; then pass "cleanup: $2"; fi
    [ "$4" -ne 0 ] && [ "$failed" -eq 0 ] && fail "run: stopped early with status $4 (see above)"
    echo "$1 test took $(($(date +%s) - RUN_STARTED)) s"
    echo "$1: $passed passed, $failed failed"
    if [ "$failed" -eq 0 ]; then exit 0; fi
    exit 1 # (a bare `exit` in an EXIT trap would return the status from before the trap)
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

pids_using() { # every process whose command line names the folder $1 (containerd, shims of that engine)
    local dir=$1 pid
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = "$$" ] && continue
        if [[ "$(tr '\0' ' ' 2> /dev/null < "/proc/$pid/cmdline")" == *"$dir/"* ]]; then echo "$pid"; fi
    done
}

alive() { # a process that has not exited (a zombie waiting to be reaped has)
    [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2> /dev/null
}

stop_pid() { # SIGTERM, wait up to $2 seconds for it to go, then SIGKILL
    local pid=$1 limit=${2:-10} i
    kill -TERM "$pid" 2> /dev/null || return 0
    for ((i = 0; i < limit * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2> /dev/null || true
}

firewall_rules() {
    { iptables-save 2> /dev/null || true; ip6tables-save 2> /dev/null || true; } | sed -e '/^#/d' -e 's/\[[0-9]*:[0-9]*\]//'
}

# The first bookworm mirror in the machine's apt sources (one-line or deb822 format).
apt_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2> /dev/null |
        awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == "bookworm") { print $i; exit } }')
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list.d/*.sources 2> /dev/null | awk '
            /^$/ { if (deb && suite && u) { print u; exit } deb = suite = 0; u = "" }
            /^Types:/ && / deb( |$)/ { deb = 1 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
            /^URIs:/ { u = $2 }
            END { if (deb && suite && u) print u }' | head -1)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# pip inside the image reaches the index the way pip here does: same index URL, same CA bundle.
host_pip_index() {
    local url=${PIP_INDEX_URL:-}
    if [ -z "$url" ]; then url=$(python3 -m pip config get global.index-url 2> /dev/null || true); fi
    case "$url" in http://* | https://*) echo "$url" ;; esac
}

# base_image [ARCH]: the Debian bookworm base for ARCH (default: this machine's, dpkg's name: amd64, arm64),
# built with debootstrap once and cached as $CACHE_DIR/debootstrap-ARCH-KEY.tar; sets BASE_IMAGE. A foreign ARCH
# runs debootstrap's second stage under qemu-user (binfmt_misc), which takes minutes: hence the cache.
# binutils (strip) is in it so that the image build needs no apt (the offline build).
base_image() {
    local arch=${1:-$(dpkg --print-architecture)} mirror index key tar rootfs
    local -a changes=(-c 'ENV LANG=C.UTF-8' -c 'CMD ["bash"]')
    # (only for a foreign arch: Podman, which maps `docker` here, builds the native one and has no --platform)
    if [ "$arch" != "$(dpkg --print-architecture)" ]; then changes+=(--platform "linux/$arch"); fi
    mirror=$(apt_mirror)
    index=$(host_pip_index)
    if [ -n "$index" ]; then changes+=(-c "ENV PIP_INDEX_URL=$index"); fi
    key=$({
        echo "recipe 2 bookworm minbase python3 python3-venv ca-certificates binutils $arch $mirror $index"
        cat /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates/* 2> /dev/null || true
    } | sha256sum | cut -c1-12)
    BASE_IMAGE=relay-test-base:$arch-$key
    tar=$CACHE_DIR/debootstrap-$arch-$key.tar
    if [ -f "$tar" ] && docker load -q -i "$tar" > /dev/null 2>&1 && docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
        log "base image $BASE_IMAGE loaded from $tar"
        return 0
    fi
    log "debootstrap --arch=$arch bookworm from $mirror (once; cached as $tar)"
    rootfs=$RUN/rootfs-$arch
    timeout 1200 debootstrap --arch="$arch" --variant=minbase --include=python3,python3-venv,ca-certificates,binutils \
        bookworm "$rootfs" "$mirror" > "$RUN/debootstrap-$arch.log" 2>&1 || {
        tail -20 "$RUN/debootstrap-$arch.log" >&2
        return 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    if compgen -G '/usr/local/share/ca-certificates/*' > /dev/null; then
        cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
    fi
    tar --numeric-owner -C "$rootfs" -c . | docker import "${changes[@]}" - "$BASE_IMAGE" > /dev/null
    rm -rf "$rootfs"
    mkdir -p "$CACHE_DIR"
    rm -f "$CACHE_DIR"/debootstrap-"$arch"-*.tar # this arch's older ones
    docker save -o "$tar.partial" "$BASE_IMAGE" && mv "$tar.partial" "$tar"
}

# The version the image is built with: git tags through setuptools-scm (scripts/image-version).
project_version() { "$REPO/scripts/image-version"; }

apt_install() { # the Debian packages named, if any (the engine tests run as root)
    [ $# -gt 0 ] || return 0
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}
