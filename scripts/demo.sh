#!/usr/bin/env bash
# The fastknock demo: the real daemons on the real kernel, in throwaway network namespaces.
#
#   server ns  (10.99.1.1, fd99:1::1 / 10.99.2.1)  letmein's example nftables ruleset,
#              fastknockfwd + fastknockd, and a protected "SSH" service on TCP port 2222
#   client ns  (10.99.1.2, fd99:1::2)              the knocker
#   other ns   (10.99.2.2)                          another machine: must stay locked out
#
# Nothing outside the namespaces is touched; everything is removed on exit. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
DEMO_USER=${DEMO_USER:-nobody}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs root (it creates network namespaces): sudo make demo" >&2
    exit 1
fi

TAG=$$
SRV=fkdemo-srv-$TAG CLI=fkdemo-cli-$TAG OTH=fkdemo-oth-$TAG
WORK=$(mktemp -d /tmp/fastknock-demo.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$SRV" "$CLI" "$OTH"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

probe() {  # probe NS ADDR WANT: try the protected port, print OPEN (with the banner) or
           # CLOSED, and fail the demo unless that is WANT
    in_ns "$1" "$PY" - "$2" "$3" <<'EOF'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 2222), timeout=2) as s:
        print("   OPEN   ->", s.recv(64).decode().strip())
        state = "OPEN"
except OSError as e:
    print("   CLOSED ->", e.strerror or "timeout")
    state = "CLOSED"
if state != sys.argv[2]:
    sys.exit(f"demo: expected {sys.argv[2]}")
EOF
}

say "creating namespaces $SRV, $CLI, $OTH"
for ns in "$SRV" "$CLI" "$OTH"; do ip netns add "$ns"; in_ns "$ns" ip link set lo up; done
ip link add "fkd1-$TAG" netns "$SRV" type veth peer name "fkd1c-$TAG" netns "$CLI"
ip link add "fkd2-$TAG" netns "$SRV" type veth peer name "fkd2c-$TAG" netns "$OTH"
in_ns "$SRV" ip addr add 10.99.1.1/24 dev "fkd1-$TAG"
in_ns "$SRV" ip -6 addr add fd99:1::1/64 dev "fkd1-$TAG" nodad
in_ns "$SRV" ip addr add 10.99.2.1/24 dev "fkd2-$TAG"
in_ns "$CLI" ip addr add 10.99.1.2/24 dev "fkd1c-$TAG"
in_ns "$CLI" ip -6 addr add fd99:1::2/64 dev "fkd1c-$TAG" nodad
in_ns "$OTH" ip addr add 10.99.2.2/24 dev "fkd2c-$TAG"
for pair in "$SRV fkd1-$TAG" "$SRV fkd2-$TAG" "$CLI fkd1c-$TAG" "$OTH fkd2c-$TAG"; do
    set -- $pair; in_ns "$1" ip link set "$2" up
done

say "loading letmein's example nftables ruleset in the server namespace (policy drop)"
in_ns "$SRV" nft -f tests/compat/nftables.conf

say "writing configs (fresh key from 'fastknock gen-key')"
KEYLINE=$("$PY" -m fastknock.cli gen-key -u 00000001)
cat >"$WORK/fastknockd.conf" <<EOF
[GENERAL]
port = 5800 / udp, tcp
control-error-policy = basic-auth

[NFTABLES]
family = inet
table = filter
chain-input = LETMEIN-INPUT
timeout = 600

[KEYS]
$KEYLINE

[RESOURCES]
00000022 = port: 2222
EOF
cat >"$WORK/fastknock.conf" <<EOF
[GENERAL]
port = 5800 / udp
control-timeout = 2.0

[CLIENT]
default-user = 00000001

[KEYS]
$KEYLINE

[RESOURCES]
00000022 = port: 2222
EOF
chmod 600 "$WORK"/*.conf
echo "   $WORK/fastknockd.conf, $WORK/fastknock.conf (key not shown)"

say "starting the protected service (TCP 2222), fastknockfwd and fastknockd"
# Background daemons are started with `ip netns exec` itself, not the in_ns function: it
# execs the program, so $! is the daemon's own PID and cleanup() really stops it.
ip netns exec "$SRV" "$PY" -c '
import socket
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", 2222)); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"SSH-2.0-fastknock-demo\r\n"); c.close()
' & PIDS+=($!)
# fastknockd drops root after binding its port; the demo uses the stock 'nobody' account
# (a real install creates 'fastknock'), which must reach fastknockfwd's socket below $WORK.
mkdir -p "$WORK/run"
chmod 755 "$WORK" "$WORK/run"
ip netns exec "$SRV" "$PY" -m fastknock.fwd -c "$WORK/fastknockd.conf" --rundir "$WORK/run" \
    --test-mode --server-user "$DEMO_USER" --no-systemd \
    2> >(sed -u 's/^/   [fwd] /' >&2) & PIDS+=($!)
for _ in $(seq 100); do [ -S "$WORK/run/fastknockfwd/fastknockfwd.sock" ] && break; sleep 0.1; done
ip netns exec "$SRV" "$PY" -m fastknock.server -c "$WORK/fastknockd.conf" --rundir "$WORK/run" \
    --user "$DEMO_USER" --no-systemd 2> >(sed -u 's/^/   [fastknockd] /' >&2) & PIDS+=($!)
for _ in $(seq 100); do
    in_ns "$SRV" ss -Hlun 'sport = :5800' | grep -q . && break; sleep 0.1
done
sleep 0.3

say "before the knock: port 2222 from the client"
probe "$CLI" 10.99.1.1 CLOSED

say "fastknock knock 10.99.1.1 2222   (from the client, over UDP, verbose)"
in_ns "$CLI" "$PY" -m fastknock.cli -c "$WORK/fastknock.conf" -v knock 10.99.1.1 2222
sleep 0.2

say "after the knock: from the client (IPv4), and from the other machine"
probe "$CLI" 10.99.1.1 OPEN
probe "$OTH" 10.99.2.1 CLOSED

say "the lease in the kernel (fastknockfwd --list)"
in_ns "$SRV" "$PY" -m fastknock.fwd -c "$WORK/fastknockd.conf" --rundir "$WORK/run" --list

say "fastknock revoke 10.99.1.1 2222"
in_ns "$CLI" "$PY" -m fastknock.cli -c "$WORK/fastknock.conf" revoke 10.99.1.1 2222 && echo "   revoked"
sleep 0.2
probe "$CLI" 10.99.1.1 CLOSED

say "a knock with a wrong key gets no answer at all (stealth: UDP + basic-auth)"
sed "s/^00000001 = .*/00000001 = $(printf 'AB%.0s' $(seq 32))/" "$WORK/fastknock.conf" >"$WORK/bad.conf"
chmod 600 "$WORK/bad.conf"  # a client config with a key: private, like the real one
if in_ns "$CLI" "$PY" -m fastknock.cli -c "$WORK/bad.conf" knock 10.99.1.1 2222; then
    echo "demo: the bad key was accepted?!" >&2; exit 1
fi
probe "$CLI" 10.99.1.1 CLOSED

say "done: cleaning up namespaces and daemons"
