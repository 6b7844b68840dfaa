#!/bin/bash
# The container image's HEALTHCHECK (deploy/docker/Dockerfile): GET /healthz on kvstashd's
# metrics port through bash's /dev/tcp, so the image needs no HTTP client. Exit 0 on a
# 200 answer, 1 otherwise (the reason on stderr).
#   kvstash-healthcheck [PORT]     (default 9464; metrics_listen in kvstashd.yaml)
port=${1:-9464}
if ! exec 3<>"/dev/tcp/127.0.0.1/$port"; then
    echo "kvstashd: nothing listens on 127.0.0.1:$port (metrics_listen)" >&2
    exit 1
fi
printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
if ! IFS= read -r -t 5 status <&3; then
    echo "kvstashd /healthz: no answer within 5 s" >&2
    exit 1
fi
case $status in
"HTTP/1."?" 200 "*) exit 0 ;;
*) echo "kvstashd /healthz: ${status%$'\r'}" >&2; exit 1 ;;
esac
