# Helpers shared by the bench scripts: `source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"`.

# free_port: prints a TCP port free on 127.0.0.1 now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT PID LOG: returns once 127.0.0.1:PORT takes connections; if process PID exits
# first, prints LOG and fails.
wait_port() {
    local port=$1 pid=$2 log=$3
    for _ in $(seq 1200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; return 1; }
        sleep 0.1
    done
    echo "no server on port $port after 120 s" >&2
    return 1
}

# rate_flags PLEXUS: prints the flags that keep PLEXUS's message rate limiter (it runs on every
# message) from refusing a benchmark's load; nothing for a build older than the limits, which has
# no such flags. Use: `read -ra FLAGS <<< "$(rate_flags "$PLEXUS")"`.
rate_flags() {
    if "$1" serve --help 2>/dev/null | grep -q -- --max-messages-per-second; then
        echo --max-messages-per-second 100000000 --message-burst 100000000
    fi
}
