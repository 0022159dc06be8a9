#!/usr/bin/env bash
# mplb WebSocket demo.
#
# Usage (from the repository root):
#
#   ./examples/run_websocket_demo.sh
#
# Starts three example backends (examples/websocket_backend.py on 127.0.0.1:8001-8003,
# named backend1..backend3), starts mplb on etc/loadbalancer.conf (listen 8080), waits
# until every port answers, runs examples/websocket_client.py through the load balancer
# (it prints which backend each connection reached, the distribution and whether
# persistence held) twice: all clients from 127.0.0.1 (ip_hash: one client address ->
# one backend), then, on Linux, each client from its own loopback address (the clients
# spread over the backends, each sticking to its own).  Then it shows mplb's upgrade
# log lines, and stops everything it started on exit or Ctrl-C (only the processes it
# started, by pid).
#
# Environment overrides:
#   MPLB            mplb command          (default: $MPLB, ./.venv/bin/mplb, mplb on PATH)
#   PYTHON          python interpreter    (default: ./.venv/bin/python, python3)
#   LB_CONF         mplb configuration    (default: etc/loadbalancer.conf)
#   LB_PORT         load balancer port    (default: the first `listen` in LB_CONF, else 8080)
#   BACKEND_PORTS   backend ports         (default: "8001 8002 8003"; names backend1..N)
#   WS_PATH         WebSocket path        (default: /)
#   CONNECTIONS     client connections    (default: 10)
#   RECONNECTS      reconnects per client (default: 3)
#   MPLB_ARGS       extra mplb arguments  (e.g. "-workers 1")
#   START_TIMEOUT   seconds to wait for the ports (default: 20)
#   DISTINCT_IPS    1: also run the client with one loopback source address per client
#                   (127.1.0.x), so ip_hash spreads them (default: 1 on Linux, else 0)
#   KEEP_RUNNING    when set, keep backends and mplb running after the client until
#                   Ctrl-C, to try the browser page at http://localhost:8080/client
#
# Exit status: the client's (0 when every connection echoed correctly and persistence
# held), 1 when something could not start.

set -u

cd "$(dirname "$0")/.." || exit 1

if [ -n "${MPLB:-}" ]; then
    MPLB_CMD=$MPLB
elif [ -x ./.venv/bin/mplb ]; then
    MPLB_CMD=./.venv/bin/mplb
elif command -v mplb >/dev/null 2>&1; then
    MPLB_CMD=$(command -v mplb)
else
    echo "run_websocket_demo: mplb not found (set MPLB, or: pip install -e .)" >&2
    exit 1
fi

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x ./.venv/bin/python ]; then
    PY=./.venv/bin/python
else
    PY=python3
fi

LB_CONF=${LB_CONF:-etc/loadbalancer.conf}
BACKEND_PORTS=${BACKEND_PORTS:-"8001 8002 8003"}
WS_PATH=${WS_PATH:-/}
CONNECTIONS=${CONNECTIONS:-10}
RECONNECTS=${RECONNECTS:-3}
MPLB_ARGS=${MPLB_ARGS:-}
START_TIMEOUT=${START_TIMEOUT:-20}
if [ -z "${DISTINCT_IPS:-}" ]; then
    # Linux routes all of 127.0.0.0/8 to the loopback interface
    if [ "$(uname -s)" = Linux ]; then DISTINCT_IPS=1; else DISTINCT_IPS=0; fi
fi

if [ ! -f "$LB_CONF" ]; then
    echo "run_websocket_demo: configuration $LB_CONF not found" >&2
    exit 1
fi
if [ -z "${LB_PORT:-}" ]; then
    # first "listen [ADDR:]PORT" directive of the configuration
    LB_PORT=$(sed -n 's/^[[:space:]]*listen[[:space:]]\{1,\}\([^;[:space:]]*\).*/\1/p' "$LB_CONF" \
              | head -n 1 | sed 's/.*://')
    LB_PORT=${LB_PORT:-8080}
fi

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mplb-demo.XXXXXX")
PIDS=()

cleanup() {
    trap - EXIT INT TERM
    if [ ${#PIDS[@]} -gt 0 ]; then
        echo "Stopping processes: ${PIDS[*]}"
        for pid in "${PIDS[@]}"; do
            kill -TERM "$pid" 2>/dev/null
        done
        # wait (bounded) for them to exit, then force
        for _ in $(seq 1 30); do
            alive=0
            for pid in "${PIDS[@]}"; do
                kill -0 "$pid" 2>/dev/null && alive=1
            done
            [ $alive -eq 0 ] && break
            sleep 0.1
        done
        for pid in "${PIDS[@]}"; do
            kill -KILL "$pid" 2>/dev/null
        done
        wait 2>/dev/null
    fi
    rm -rf "$LOG_DIR"
}
trap cleanup EXIT
trap 'echo; echo "Interrupted"; exit 130' INT
trap 'exit 143' TERM

port_open() {  # port_open PORT: true when 127.0.0.1:PORT accepts a connection
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() {  # wait_port PORT PID NAME LOG
    local port=$1 pid=$2 name=$3 log=$4
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "run_websocket_demo: $name exited before listening on port $port:" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "run_websocket_demo: $name not listening on port $port after ${START_TIMEOUT}s" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
        sleep 0.1
    done
}

echo "== mplb WebSocket demo"
echo "   mplb: $MPLB_CMD   config: $LB_CONF   port: $LB_PORT   backends: $BACKEND_PORTS"

for port in $BACKEND_PORTS; do
    if port_open "$port"; then
        echo "run_websocket_demo: port $port is already in use (set BACKEND_PORTS)" >&2
        exit 1
    fi
done
if port_open "$LB_PORT"; then
    echo "run_websocket_demo: port $LB_PORT is already in use (set LB_CONF to a config with another listen)" >&2
    exit 1
fi

i=0
for port in $BACKEND_PORTS; do
    i=$((i + 1))
    "$PY" examples/websocket_backend.py --port "$port" --name "backend$i" \
        >"$LOG_DIR/backend$i.log" 2>&1 &
    PIDS+=($!)
    echo "   started backend$i on 127.0.0.1:$port (pid $!)"
done

# shellcheck disable=SC2086  # MPLB_ARGS is split on purpose
"$MPLB_CMD" -conf "$LB_CONF" -v $MPLB_ARGS >"$LOG_DIR/mplb.log" 2>&1 &
MPLB_PID=$!
PIDS+=($MPLB_PID)
echo "   started mplb (pid $MPLB_PID)"

i=0
for port in $BACKEND_PORTS; do
    i=$((i + 1))
    wait_port "$port" "${PIDS[$((i - 1))]}" "backend$i" "$LOG_DIR/backend$i.log" || exit 1
done
wait_port "$LB_PORT" "$MPLB_PID" "mplb" "$LOG_DIR/mplb.log" || exit 1
echo "   all ports answer"
echo

URL="ws://localhost:$LB_PORT$WS_PATH"
echo "== 1. client: $CONNECTIONS connections from one address (127.0.0.1), $RECONNECTS reconnects each"
echo "   $URL"
"$PY" examples/websocket_client.py --url "$URL" --connections "$CONNECTIONS" \
    --reconnects "$RECONNECTS" --timeout 5 --strict
status=$?

if [ "$DISTINCT_IPS" = 1 ]; then
    echo
    echo "== 2. client: $CONNECTIONS clients, each from its own loopback address (127.1.0.x),"
    echo "   $RECONNECTS reconnects each: ip_hash spreads them and keeps each on its backend"
    "$PY" examples/websocket_client.py --url "$URL" --connections "$CONNECTIONS" \
        --reconnects "$RECONNECTS" --timeout 5 --strict --distinct-ips
    status2=$?
    [ $status -eq 0 ] && status=$status2
fi

echo
echo "== mplb log (upgrade lines: $(grep -c upgrade "$LOG_DIR/mplb.log"))"
grep upgrade "$LOG_DIR/mplb.log" | tail -n 5
if [ $status -ne 0 ]; then
    echo "== last mplb log lines"
    tail -n 20 "$LOG_DIR/mplb.log"
fi
echo
if [ $status -eq 0 ]; then
    echo "Demo finished: OK"
else
    echo "Demo finished: FAILED (client exit status $status)"
fi
if [ -n "${KEEP_RUNNING:-}" ]; then
    echo "Backends and mplb keep running (KEEP_RUNNING is set): open http://localhost:$LB_PORT/client"
    echo "in a browser; press Ctrl-C to stop."
    while kill -0 "$MPLB_PID" 2>/dev/null; do sleep 1; done
    echo "mplb exited"
else
    echo "(KEEP_RUNNING=1 ./examples/run_websocket_demo.sh keeps everything running for the browser page)"
fi
exit $status
