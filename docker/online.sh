#!/bin/sh
# online.sh WHAT COMMAND...: run a build step that needs the network (apt-get, pip from an index). When
# it fails and its output shows that the network is missing, end with one line that says so, so the
# cause is the last thing the build prints rather than a consequence such as "no installation candidate".
set -u
what=$1
shift
out=/tmp/online.$$.log
"$@" > "$out" 2>&1
status=$?
cat "$out"
if [ "$status" -ne 0 ]; then
    cause=""
    # The root cause first: a failed name lookup shows up inside pip's "Failed to establish..." lines.
    for pattern in "Temporary failure (in name resolution|resolving '[^']*')" "Could not resolve [^ ]*" \
        "Name or service not known" "Network is unreachable" "No route to host" "Connection refused" \
        "Failed to establish a new connection"; do
        cause=$(grep -m1 -oE "$pattern" "$out")
        [ -n "$cause" ] && break
    done
    if [ -n "$cause" ]; then
        echo "build needs network: $what failed ($cause); see README 'Offline build'"
    fi
fi
rm -f "$out"
exit "$status"
