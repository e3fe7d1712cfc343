#!/usr/bin/env bash
# Stand-ins for the public base images, made from Debian's packages, for a Docker engine that can reach no
# image registry (this project's machines). Elsewhere you do not need this script: docker pulls the real ones.
#
#   local/python:3.11   debootstrap bookworm (python3 3.11, pip, venv, ca-certificates) + this host's CA bundle
#   python:3.11-slim    the same image, under the name the Dockerfile's default BASE_IMAGE uses
#   redis:7             the same base + Debian's redis-server 7.0, behaving like the official image
#                       (WORKDIR/VOLUME /data, runs as user redis, protected mode off as in the official build)
#   mher/flower:2.0     the same base + pip's flower 2.0 (only for `docker compose --profile flower`)
#
# So the unchanged Dockerfile and docker-compose.yml run. Idempotent: an image already present is kept
# (FORCE=1 rebuilds them all; `docker rmi` one to rebuild only it). Needs root, debootstrap and a running dockerd.
#
#   scripts/local-base-images.sh            # all four
#   SKIP_FLOWER=1 scripts/local-base-images.sh
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK:-/var/tmp/convlens-rootfs}
FORCE=${FORCE:-0}

log() { printf '[local-base-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
have() { [[ $FORCE != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }

[[ $(id -u) == 0 ]] || { echo "run as root (debootstrap, docker)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "apt-get install -y debootstrap" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "no Docker engine answers (start dockerd)" >&2; exit 1; }

# --- python -----------------------------------------------------------------------------------------------
if have local/python:3.11; then
  log "local/python:3.11 present"
else
  t0=$SECONDS
  root="$WORK/python"
  rm -rf "$root" && mkdir -p "$root"
  log "debootstrap $SUITE into $root"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  # Downloads here pass a TLS-inspecting proxy: trust this host's bundle. The copy under
  # /usr/local/share/ca-certificates survives a later update-ca-certificates inside the image.
  cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp "$CA_BUNDLE" "$root/usr/local/share/ca-certificates/host-bundle.crt"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # Slim like the official image: no apt lists, caches, docs or man pages.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
  # `python` as the official image has it (Debian names it python3 only).
  ln -sf python3 "$root/usr/bin/python"
  tar --numeric-owner -C "$root" -c . | docker import \
    -c 'ENV LANG=C.UTF-8' -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["python3"]' -m "debootstrap $SUITE minbase + python3 (stand-in for python:3.11-slim)" \
    - local/python:3.11 >/dev/null
  rm -rf "$root"
  log "local/python:3.11 imported in $((SECONDS - t0)) s"
fi
docker tag local/python:3.11 python:3.11-slim

# --- redis ------------------------------------------------------------------------------------------------
build_from_base() {  # name, dockerfile text (on stdin)
  local ctx
  ctx=$(mktemp -d)
  cat >"$ctx/Dockerfile"
  docker build --network host -q -t "$1" "$ctx" >/dev/null
  rm -rf "$ctx"
}

if have redis:7; then
  log "redis:7 present"
else
  t0=$SECONDS
  build_from_base redis:7 <<'EOF'
FROM local/python:3.11
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '%s\n' '#!/bin/sh' \
    '# like the official image: redis-server without a config file has protected mode off' \
    'if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi' \
    'if [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
    'exec "$@"' > /usr/local/bin/docker-entrypoint.sh && chmod +x /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
EOF
  log "redis:7 built in $((SECONDS - t0)) s"
fi

# --- flower -----------------------------------------------------------------------------------------------
if [[ ${SKIP_FLOWER:-0} == 1 ]]; then
  log "flower skipped"
elif have mher/flower:2.0; then
  log "mher/flower:2.0 present"
else
  t0=$SECONDS
  build_from_base mher/flower:2.0 <<'EOF'
FROM local/python:3.11
RUN python3 -m venv /opt/flower && /opt/flower/bin/pip install -q --no-cache-dir 'flower>=2.0,<2.1' 'celery[redis]' \
 && useradd --system --create-home flower && mkdir -p /data && chown flower /data
ENV PATH=/opt/flower/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /data
USER flower
EXPOSE 5555
CMD ["celery", "flower"]
EOF
  log "mher/flower:2.0 built in $((SECONDS - t0)) s"
fi

docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(local/python|python|redis|mher/flower):' >&2
