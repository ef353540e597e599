#!/bin/sh
# HAProxy in front of compose/ha.yml's gateways: round robin over LB_BACKENDS
# (host:port,host:port), listening on LB_PORT (8000).
#
# A gateway that stops answering is skipped: a connection refused or timed out (2 s)
# is retried on the next gateway (POSTs too: nothing was sent yet) and marks the server
# down at once (observe layer4); a TCP check every 2 s brings it back once it accepts
# again. Names resolve through Docker's DNS (127.0.0.11) at run time, so a gateway may
# start after the balancer, or come back with another address.
#
#   lb.sh          write the configuration and run HAProxy
#   lb.sh check    something accepts connections on LB_PORT (the compose healthcheck)
set -eu
port=${LB_PORT:-8000}
case "${1:-run}" in
  check) exec bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" ;;
  run) ;;
  *) echo "usage: lb.sh [run|check]" >&2; exit 2 ;;
esac
backends=${LB_BACKENDS:?set LB_BACKENDS to host:port,host:port}
# Above the gateway's longest ?wait (IMGPIPE_MAX_WAIT_S, 120 s) and its own timeouts.
server_timeout=${LB_SERVER_TIMEOUT:-150s}
cfg=${LB_CONFIG:-/tmp/haproxy.cfg}
{
  cat <<CFG
global
  log stdout format raw local0 notice
  maxconn 4096

defaults
  mode http
  log global
  option dontlognull
  timeout connect 2s
  timeout client ${server_timeout}
  timeout server ${server_timeout}
  timeout http-request 30s
  timeout queue 30s
  retries 2
  option redispatch 1

resolvers docker
  nameserver dns 127.0.0.11:53
  hold valid 5s
  hold nx 2s

frontend http
  bind :${port}
  # Uploads are up to IMGPIPE_MAX_UPLOAD_BYTES (50 MB): the gateway checks the size.
  default_backend gateways

backend gateways
  balance roundrobin
  default-server check inter 2s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down resolvers docker init-addr last,libc,none
CFG
  n=0
  for b in $(echo "$backends" | tr ',' ' '); do
    n=$((n + 1))
    echo "  server gateway$n $b"
  done
} >"$cfg"
exec haproxy -W -db -f "$cfg"
