#!/usr/bin/env bash
# Real link shaping on one Linux machine: one network namespace per device, joined by a
# bridge, each device's egress shaped with tc (htb per destination, netem for delay).
# The alternative to AdaptLink's emulated links (`adaptlink profile --link-bandwidth`),
# which the sending transport enforces: here the kernel does it, for any traffic.
#
#   sudo experiments/netns_shaping.sh up 2 --rate 100mbit [--delay 2ms] [--pair 0-1=20mbit/5ms]
#   sudo experiments/netns_shaping.sh check 0 1          # TCP throughput 0 -> 1 (python, ~3 s)
#   sudo experiments/netns_shaping.sh profile 2 MODEL OUT.json [profile options]
#                                                        # one torchrun per namespace, node 0 at 10.77.0.1
#   sudo experiments/netns_shaping.sh exec 1 CMD...      # anything else inside device 1's namespace
#   sudo experiments/netns_shaping.sh down
#
# Layout: namespace alnsI holds veth `eth0` with 10.77.0.(I+1)/24; its peer `alvI` sits on
# bridge `albr0` in the root namespace. Egress of alnsI's eth0: htb root, one class per
# destination device (rate from --pair, else --rate), u32 filters on the destination IP,
# a netem child for the delay. Shaping is per direction: --pair 0-1=X shapes 0 -> 1 only
# unless 1-0 is given too; a pair "0-1=20mbit/5ms" sets rate and delay of that direction.
#
# Needs root (CAP_NET_ADMIN), iproute2 (`ip`, `tc`), kernel qdiscs sch_htb (rate) and
# sch_netem (delay). The script checks and says which are missing.
#
# Status on the machine this was written on (the 2-core CI box, 2025-11): WORKS FOR RATE,
# NOT FOR DELAY. As root, `ip netns`, veth, bridge and htb work; `tc qdisc add ... netem`
# fails with "Specified qdisc kind is unknown" (no sch_netem in this kernel), so --delay
# and /DELAY are refused there. Measured here with `up 2 --rate 100mbit`: `check 0 1` gave
# 98.4 Mbit/s of TCP goodput; with `up 2 --rate 100mbit --pair 1-0=20mbit`, `profile 2`
# (tiny model, gloo over the shaped veths) measured ns0->ns1 93.8 Mbit/s and ns1->ns0
# 19.1 Mbit/s: experiments/results/profile_netns_cluster.json. Where a machine has no root
# (most CI), use the emulated links of `adaptlink profile --link-bandwidth` instead.
set -euo pipefail

PREFIX=alns
BRIDGE=albr0
SUBNET=10.77.0
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}

die() { echo "netns_shaping: $*" >&2; exit 2; }
ns() { echo "${PREFIX}$1"; }
ip_of() { echo "${SUBNET}.$(($1 + 1))"; }

need_tools() {
  [[ $(id -u) -eq 0 ]] || die "needs root (CAP_NET_ADMIN): run with sudo"
  command -v ip >/dev/null || die "needs iproute2's ip"
  command -v tc >/dev/null || die "needs iproute2's tc"
}

have_qdisc() {  # have_qdisc KIND: can this kernel create that qdisc?
  local probe="${PREFIX}probe"
  ip netns add "$probe" 2>/dev/null || true
  local ok=1
  case $1 in
    netem) ip netns exec "$probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null && ok=0 ;;
    htb) ip netns exec "$probe" tc qdisc add dev lo root handle 1: htb 2>/dev/null && ok=0 ;;
  esac
  ip netns del "$probe" 2>/dev/null || true
  return $ok
}

to_kbit() {  # 100mbit, 1gbit, 500kbit -> kbit (tc understands the units, we only validate)
  [[ $1 =~ ^[0-9]+(\.[0-9]+)?(kbit|mbit|gbit)$ ]] || die "rate '$1': use e.g. 100mbit, 1gbit, 500kbit"
  echo "$1"
}

cmd_up() {
  local n=$1; shift
  [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 200 ]] || die "up: N must be 2..200, got '$n'"
  local rate=10gbit delay="" pairs=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --rate) rate=$(to_kbit "$2"); shift 2 ;;
      --delay) delay=$2; shift 2 ;;
      --pair) pairs+=("$2"); shift 2 ;;
      *) die "up: unknown option '$1'" ;;
    esac
  done
  need_tools
  have_qdisc htb || die "kernel has no sch_htb: cannot shape rate"
  local netem=0
  if have_qdisc netem; then netem=1; fi
  if [[ -n $delay || "${pairs[*]:-}" == */* ]] && [[ $netem -eq 0 ]]; then
    die "kernel has no sch_netem: delays cannot be shaped here (drop --delay and /DELAY)"
  fi
  ip netns list | grep -q "^$(ns 0)\b" && die "already up: run '$0 down' first"

  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for ((i = 0; i < n; i++)); do
    ip netns add "$(ns $i)"
    ip link add "alv$i" type veth peer name eth0 netns "$(ns $i)"
    ip link set "alv$i" master "$BRIDGE" up
    ip -n "$(ns $i)" addr add "$(ip_of $i)/24" dev eth0
    ip -n "$(ns $i)" link set eth0 up
    ip -n "$(ns $i)" link set lo up
  done
  # per source i: htb with one class per destination j
  for ((i = 0; i < n; i++)); do
    local x="ip netns exec $(ns $i) tc"
    $x qdisc add dev eth0 root handle 1: htb default 1
    $x class add dev eth0 parent 1: classid 1:1 htb rate 10gbit quantum 60000   # ARP, anything unmatched
    for ((j = 0; j < n; j++)); do
      [[ $i -eq $j ]] && continue
      local r=$rate d=$delay p
      for p in "${pairs[@]:-}"; do
        [[ -z $p ]] && continue
        [[ $p =~ ^([0-9]+)-([0-9]+)=([^/]+)(/(.+))?$ ]] || die "--pair '$p': use SRC-DST=RATE[/DELAY]"
        if [[ ${BASH_REMATCH[1]} -eq $i && ${BASH_REMATCH[2]} -eq $j ]]; then
          r=$(to_kbit "${BASH_REMATCH[3]}"); d=${BASH_REMATCH[5]:-$delay}
        fi
      done
      local cid=$((10 + j))
      $x class add dev eth0 parent 1: classid "1:$cid" htb rate "$r" ceil "$r" quantum 60000
      $x filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst "$(ip_of $j)/32" flowid "1:$cid"
      if [[ -n $d ]]; then
        $x qdisc add dev eth0 parent "1:$cid" handle "$cid:" netem delay "$d" limit 100000
      fi
      echo "$(ns $i) $(ip_of $i) -> $(ip_of $j): rate $r${d:+, delay $d}"
    done
  done
}

cmd_down() {
  need_tools
  local n
  for n in $(ip netns list | awk '{print $1}' | grep "^${PREFIX}[0-9]*$" || true); do ip netns del "$n"; done
  ip link del "$BRIDGE" 2>/dev/null || true
  echo "down"
}

cmd_exec() {
  local i=$1; shift
  need_tools
  ip netns exec "$(ns $i)" env MASTER_ADDR="$(ip_of 0)" GLOO_SOCKET_IFNAME=eth0 "$@"
}

cmd_check() {  # TCP goodput from device A to device B for ~3 s
  local a=$1 b=$2 port=47011
  need_tools
  ip netns exec "$(ns $b)" "$PY" -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('$(ip_of $b)', $port)); s.listen(1); c, _ = s.accept()
while c.recv(1 << 20): pass" &
  local srv=$!
  sleep 0.5
  ip netns exec "$(ns $a)" "$PY" -c "
import socket, time
s = socket.create_connection(('$(ip_of $b)', $port)); buf = bytes(1 << 20); n = 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < 3: s.sendall(buf); n += len(buf)
s.close(); print(f'$(ns $a) -> $(ns $b): {n * 8 / (time.perf_counter() - t0) / 1e6:.1f} Mbit/s TCP goodput')"
  wait "$srv"
}

cmd_profile() {  # profile N MODEL OUT [options]: one torchrun per namespace
  local n=$1 model=$2 out=$3; shift 3
  need_tools
  local port=29577 pids=() i
  for ((i = 0; i < n; i++)); do
    cmd_exec "$i" "$PY" -m torch.distributed.run --nnodes "$n" --node-rank "$i" --nproc-per-node 1 \
      --max-restarts 0 --master-addr "$(ip_of 0)" --master-port "$port" \
      -m adaptlink.cli profile --model "$model" --out "$out" --names "$(seq -s, -f 'ns%g' 0 $((n - 1)))" "$@" &
    pids+=($!)
  done
  local rc=0
  for i in "${pids[@]}"; do wait "$i" || rc=$?; done
  return $rc
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  exec) shift; cmd_exec "$@" ;;
  check) shift; cmd_check "${1:-0}" "${2:-1}" ;;
  profile) shift; cmd_profile "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
