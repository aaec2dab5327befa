#!/usr/bin/env bash
# Start a Docker daemon the way these machines allow, or stop the one this script started.
#   scripts/dockerd.sh start   prints the daemon's PID once `docker info` answers (nothing started, and
#                              "running" printed, when a daemon already answers); exit 1 with the reason and
#                              the log's tail when it cannot start within PDSERVE_DOCKERD_TIMEOUT_S (60)
#   scripts/dockerd.sh stop    stops the daemon this script started (its PID file), waiting for it to exit
# No iptables (no NAT: containers on one compose network reach each other over its bridge, published ports go
# through docker-proxy, builds use the host's network).  Storage: dockerd's own choice, overlay2 where the kernel
# and the data root's file system allow it, else vfs (which copies the whole tree for every layer and container:
# several times slower); PDSERVE_DOCKER_STORAGE_DRIVER forces one.  A data root keeps the driver it was made
# with.  Data: PDSERVE_DOCKER_ROOT (default /var/lib/docker); log and PID file next to it.
set -euo pipefail

ROOT=${PDSERVE_DOCKER_ROOT:-/var/lib/docker}
PIDFILE=$ROOT.pdserve.pid
LOG=$ROOT.pdserve.log
TIMEOUT_S=${PDSERVE_DOCKERD_TIMEOUT_S:-60}

fail() { echo "dockerd.sh: $*" >&2; exit 1; }

start() {
  command -v docker >/dev/null || fail "no docker client on PATH (Debian: apt-get install docker.io)"
  if docker info >/dev/null 2>&1; then echo running; return; fi
  [ "$(id -u)" = 0 ] || fail "starting dockerd needs root"
  command -v dockerd >/dev/null || fail "no dockerd on PATH (Debian: apt-get install docker.io)"
  mkdir -p "$ROOT"
  setsid dockerd --iptables=false --data-root "$ROOT" \
    ${PDSERVE_DOCKER_STORAGE_DRIVER:+--storage-driver="$PDSERVE_DOCKER_STORAGE_DRIVER"} >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  for _ in $(seq "$((TIMEOUT_S * 2))"); do
    if docker info >/dev/null 2>&1; then echo "$pid"; return; fi
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; fail "dockerd exited: $(tail -n 5 "$LOG")"; }
    sleep 0.5
  done
  kill "$pid"; rm -f "$PIDFILE"
  fail "dockerd did not answer within ${TIMEOUT_S} s: $(tail -n 5 "$LOG")"
}

stop() {
  [ -f "$PIDFILE" ] || fail "no $PIDFILE: this script started no daemon"
  local pid; pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq "$((TIMEOUT_S * 2))"); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; return; }
    sleep 0.5
  done
  fail "dockerd ($pid) still running after ${TIMEOUT_S} s"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) fail "usage: $0 start|stop" ;;
esac
