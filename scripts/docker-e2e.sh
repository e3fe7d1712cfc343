#!/usr/bin/env bash
# End-to-end proof of the containers: build the image, `docker compose up`, wait for health, train a 1-epoch
# model on synthetic data through POST /train, watch the worker container finish it, serve the new checkpoint
# (/models, /ready, /predict) through the api container, then `docker compose down -v`.
#
#   scripts/docker-e2e.sh                  # CPU host: docker-compose.yml + docker-compose.cpu.yml
#   E2E_GPU=1 scripts/docker-e2e.sh        # GPU host: docker-compose.yml alone (the worker reserves a GPU)
#
# Environment (all optional):
#   E2E_BUILD=0            use the existing $CONVLENS_IMAGE instead of building it
#   E2E_TORCH_VARIANT      cuda (default: what docker-compose.yml builds) or cpu
#   E2E_LOCAL_BASE=auto    make stand-in base images (scripts/local-base-images.sh) when python:3.11-slim or
#                          redis:7 are missing and cannot be pulled; 0: never
#   E2E_LOCAL_WHEELS=auto  serve this host's pip indexes (file:// extra-index-url, find-links from `pip config`)
#                          on 127.0.0.1 to the build (--network host), so torch is not downloaded; 0: never
#   E2E_WHEEL_PORT=18765   first port tried for that wheel server
#   E2E_PORT=18080         host port for the api (CONVLENS_PUBLISH); E2E_FLOWER_PORT=15555; E2E_FLOWER=0 skips it
#   E2E_KEEP=1             leave the stack up at the end (default: down -v)
#   E2E_TIMEOUT=900        seconds to wait for the training job
#   E2E_BUILD_ARGS         more `docker build` arguments, e.g. "--build-arg PIP_INDEX_URL=https://mirror/simple"
#                          (a PIP_* build argument given here switches off E2E_LOCAL_WHEELS)
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${E2E_PROJECT:-convlens-e2e}
export CONVLENS_IMAGE=${CONVLENS_IMAGE:-convlens:latest}
export CONVLENS_PUBLISH=${E2E_PORT:-18080}
export CONVLENS_FLOWER_PUBLISH=${E2E_FLOWER_PORT:-15555}
TORCH_VARIANT=${E2E_TORCH_VARIANT:-cuda}
TIMEOUT=${E2E_TIMEOUT:-900}
API=http://127.0.0.1:$CONVLENS_PUBLISH
RUN_ID=e2e-$(date -u +%Y%m%d-%H%M%S)
WORK=$(mktemp -d /tmp/convlens-e2e.XXXXXX)
T_START=$SECONDS
declare -A TIMES=()

log() { printf '[e2e %s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - T_START))" "$*"; }
die() { log "FAILED: $*"; exit 1; }

SERVER_PID=
cleanup() {
  local rc=$?
  if ! declare -F dc >/dev/null; then rm -rf "$WORK"; exit $rc; fi
  if [[ $rc != 0 ]]; then
    log "logs of the failed run (last 40 lines per service):"
    dc logs --no-color --tail=40 2>&1 | sed 's/^/    /' || true
  fi
  if [[ ${E2E_KEEP:-0} == 1 ]]; then log "E2E_KEEP=1: stack left up (project $PROJECT)"
  else dc down -v --remove-orphans >/dev/null 2>&1 || true; log "down -v: containers, network and volumes removed"; fi
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

# --- a Docker engine: on a bare Debian machine (root), install and start one ------------------------------
if ! docker info >/dev/null 2>&1; then
  [[ ${E2E_INSTALL:-auto} != 0 && $(id -u) == 0 ]] && command -v apt-get >/dev/null \
    || die "no Docker engine answers (start dockerd)"
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
     || ! { docker compose version || command -v docker-compose; } >/dev/null 2>&1; then
    log "installing docker.io, docker-compose, debootstrap (apt)"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      docker.io docker-compose debootstrap >/dev/null
  fi
  log "starting dockerd (log: /tmp/dockerd.log; it keeps running after this script)"
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not start: $(tail -5 /tmp/dockerd.log)"
fi

# --- the compose command: v2 plugin, else v1 --------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else die "neither 'docker compose' nor 'docker-compose' found"; fi
FILES=(-f docker-compose.yml)
WORKER=worker
if [[ ${E2E_GPU:-0} != 1 ]]; then FILES+=(-f docker-compose.cpu.yml); WORKER=worker-cpu; fi
PROFILES=()
[[ ${E2E_FLOWER:-1} == 1 ]] && PROFILES=(--profile flower)
dc() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "${PROFILES[@]}" "$@"; }

log "compose: $("${COMPOSE[@]}" version 2>/dev/null | head -1); engine: $(docker version -f '{{.Server.Version}}')"

# --- base images ------------------------------------------------------------------------------------------
need_base=0
for img in python:3.11-slim redis:7; do
  docker image inspect "$img" >/dev/null 2>&1 || docker pull -q "$img" >/dev/null 2>&1 || need_base=1
done
if [[ $need_base == 1 ]]; then
  [[ ${E2E_LOCAL_BASE:-auto} == 0 ]] && die "python:3.11-slim / redis:7 missing and cannot be pulled"
  log "base images cannot be pulled: making stand-ins (scripts/local-base-images.sh)"
  t=$SECONDS; SKIP_FLOWER=$([[ ${E2E_FLOWER:-1} == 1 ]] && echo 0 || echo 1) scripts/local-base-images.sh
  TIMES[base_images]=$((SECONDS - t))
fi
if [[ ${E2E_FLOWER:-1} == 1 ]] && ! docker image inspect mher/flower:2.0 >/dev/null 2>&1; then
  docker pull -q mher/flower:2.0 >/dev/null 2>&1 || scripts/local-base-images.sh
fi

# --- this host's pip indexes, on loopback, for the build --------------------------------------------------
BUILD_ARGS=(--build-arg "TORCH_VARIANT=$TORCH_VARIANT")
read -r -a extra <<<"${E2E_BUILD_ARGS:-}"
BUILD_ARGS+=("${extra[@]}")
user_pip=0
[[ ${E2E_BUILD_ARGS:-} == *PIP_* ]] && user_pip=1
if [[ ${E2E_BUILD:-1} == 1 && $user_pip == 0 && ${E2E_LOCAL_WHEELS:-auto} != 0 ]] && command -v pip >/dev/null; then
  root=$WORK/wheels; mkdir -p "$root"
  # A fixed port and fixed paths: the build arguments are part of the layer cache key, so a new port each
  # run would rebuild the multi-GB torch layer every time.
  port=
  for p in $(seq "${E2E_WHEEL_PORT:-18765}" $((${E2E_WHEEL_PORT:-18765} + 20))); do
    python3 -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', $p))" 2>/dev/null && { port=$p; break; }
  done
  [[ -n $port ]] || die "no free port for the wheel server"
  indexes=() links=() seen=() i=0
  # file:// indexes: serve the folder above `simple/` (their pages link ../../files/...); find-links: as is.
  for u in $(pip config get global.extra-index-url 2>/dev/null || true); do
    p=${u#file://}; [[ $u == file://* && -d $p ]] || continue
    ln -s "$(dirname "$p")" "$root/i$i"; indexes+=("http://127.0.0.1:$port/i$i/$(basename "$p")/"); i=$((i + 1))
  done
  for p in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
    p=${p#file://}; [[ -d $p && " ${seen[*]} " != *" $p "* ]] || continue
    seen+=("$p")
    ln -s "$p" "$root/i$i"; links+=("http://127.0.0.1:$port/i$i/"); i=$((i + 1))
  done
  if (( ${#indexes[@]} + ${#links[@]} > 0 )); then
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$root" >"$WORK/wheels.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
    # The local indexes come first so that, for equal versions, pip takes their files over PyPI's.
    if (( ${#indexes[@]} > 0 )); then
      BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=${indexes[0]}"
                   --build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]:1} https://pypi.org/simple")
    fi
    (( ${#links[@]} > 0 )) && BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
    BUILD_ARGS+=(--build-arg PIP_TRUSTED_HOST=127.0.0.1)
    log "serving this host's pip indexes on 127.0.0.1:$port: ${indexes[*]} ${links[*]}"
  fi
fi

# --- build ------------------------------------------------------------------------------------------------
if [[ ${E2E_BUILD:-1} == 1 ]]; then
  log "docker build --network host (TORCH_VARIANT=$TORCH_VARIANT) -> $CONVLENS_IMAGE"
  t=$SECONDS
  docker build --network host "${BUILD_ARGS[@]}" -t "$CONVLENS_IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; die "docker build"; }
  TIMES[build]=$((SECONDS - t))
  grep -E '^torch .* cuda' "$WORK/build.log" | tail -1 | sed 's/^/    /' || true
  log "built in ${TIMES[build]} s"
fi
docker image inspect "$CONVLENS_IMAGE" >/dev/null || die "no image $CONVLENS_IMAGE (E2E_BUILD=0 needs one)"

# --- up and healthy ---------------------------------------------------------------------------------------
http() {  # METHOD PATH [curl args...]: prints the body, then a line "HTTP <code>"
  local m=$1 p=$2; shift 2
  curl -s -X "$m" -w '\nHTTP %{http_code}\n' "$@" "$API$p"
}
status_of() { tail -1 <<<"$1" | awk '{print $2}'; }
body_of() { sed '$d' <<<"$1"; }

health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1"; }
dc down -v --remove-orphans >/dev/null 2>&1 || true
log "compose up -d (${FILES[*]} ${PROFILES[*]})"
t=$SECONDS
dc up -d --no-build 2>&1 | sed 's/^/    /'
services=(redis api "$WORKER")
[[ ${E2E_FLOWER:-1} == 1 ]] && services+=(flower)
for _ in $(seq 240); do
  states=() all=1
  for s in "${services[@]}"; do
    cid=$(dc ps -q "$s"); st=$( [[ -n $cid ]] && health "$cid" || echo missing)
    states+=("$s=$st")
    [[ $st == healthy ]] || all=0
    [[ $st == unhealthy || $st == exited || $st == dead ]] && die "$s is $st"
  done
  [[ $all == 1 ]] && break
  sleep 1
done
[[ $all == 1 ]] || die "not healthy after 240 s: ${states[*]}"
TIMES[up_to_healthy]=$((SECONDS - t))
log "healthy in ${TIMES[up_to_healthy]} s: ${states[*]}"

r=$(http GET /health); log "GET /health -> $(status_of "$r") $(body_of "$r")"
r=$(http GET /ready); log "GET /ready (no model yet) -> $(status_of "$r") $(body_of "$r")"

# --- a fresh install: no model, so /predict explains how to get one ---------------------------------------
dc exec -T api python -c "
import io, sys
import numpy as np
from PIL import Image
from models.synthetic import synthetic_images
x, y = synthetic_images(1, 10, np.random.default_rng(123))
Image.fromarray(x.reshape(3, 32, 32).transpose(1, 2, 0)).save(sys.stdout.buffer, format='PNG')
sys.stderr.write(f'label {y[0]}\n')" >"$WORK/img.png" 2>"$WORK/label.txt"
LABEL=$(awk '{print $2}' "$WORK/label.txt")
log "test image: synthetic class $LABEL ($(stat -c %s "$WORK/img.png") bytes PNG, made in the api container)"
r=$(http POST /predict -F "files=@$WORK/img.png")
log "POST /predict before any model -> $(status_of "$r") $(body_of "$r")"

# --- synthetic data into the dataset volume ---------------------------------------------------------------
t=$SECONDS
dc exec -T api python -c "
from models.synthetic import write_synthetic_cifar
print(write_synthetic_cifar('/data', 'cifar10', n_train=1000, n_test=200))" | sed 's/^/    wrote /'
log "synthetic CIFAR-10 (1000 train / 200 test) in the dataset volume in $((SECONDS - t)) s"

# --- train through the API, on the worker container -------------------------------------------------------
cfg='{"dataset":"cifar10","epochs":1,"batch_size":50,"val_size":100,"milestones":[],"log_every":5}'
t=$SECONDS
r=$(http POST "/train?run_id=$RUN_ID" -H 'Content-Type: application/json' -d "$cfg")
[[ $(status_of "$r") == 202 ]] || die "POST /train -> $r"
log "POST /train -> 202 $(body_of "$r" | jq -c '{id, status, dispatched}')"
status=queued
for _ in $(seq "$TIMEOUT"); do
  job=$(curl -fs "$API/jobs/$RUN_ID") || die "GET /jobs/$RUN_ID"
  new=$(jq -r .status <<<"$job")
  [[ $new != "$status" ]] && { log "job $RUN_ID: $status -> $new"; status=$new; }
  [[ $status == succeeded || $status == failed || $status == cancelled ]] && break
  sleep 1
done
TIMES[train_job]=$((SECONDS - t))
[[ $status == succeeded ]] || die "job ended $status: $(jq -c '{error, attempts}' <<<"$job")"
log "job succeeded in ${TIMES[train_job]} s: $(jq -c '{attempts, best_epoch, best_checkpoint, metrics}' <<<"$job")"
log "worker container's log of it:"
dc logs --no-color "$WORKER" 2>&1 | grep -E "convlens.train|$RUN_ID" | tail -4 | sed 's/^/    /'

# --- the api serves the new checkpoint --------------------------------------------------------------------
r=$(http GET /models)
log "GET /models -> $(status_of "$r") $(body_of "$r" | jq -c '{default, models: [.models[] | {id, arch, accuracy, epoch, source, default}]}')"
[[ $(body_of "$r" | jq -r --arg id "$RUN_ID" '[.models[].id] | index($id) != null') == true ]] \
  || die "$RUN_ID is not among /models"
r=$(http POST "/models/$RUN_ID/default")
log "POST /models/$RUN_ID/default -> $(status_of "$r") $(body_of "$r" | jq -c '{id, default, loaded, sha256}')"
[[ $(status_of "$r") == 200 ]] || die "set default"
r=$(http GET /ready)
log "GET /ready -> $(status_of "$r") $(body_of "$r")"
[[ $(status_of "$r") == 200 ]] || die "/ready after training"
r=$(http POST "/predict?top_k=3" -F "files=@$WORK/img.png")
log "POST /predict -> $(status_of "$r") $(body_of "$r" | jq -c .)"
[[ $(status_of "$r") == 200 ]] || die "/predict"
[[ $(body_of "$r" | jq -r .model) == "$RUN_ID" ]] || die "/predict answered with another model"
top=$(body_of "$r" | jq -r '.predictions[0].top_k[0].index')
log "predicted class $top for an image of class $LABEL ($([[ $top == "$LABEL" ]] && echo right || echo wrong))"

# --- the volumes persist: recreate the api container, the model is still there -----------------------------
t=$SECONDS
dc up -d --no-build --force-recreate --no-deps api 2>&1 | sed 's/^/    /'
for _ in $(seq 120); do
  cid=$(dc ps -q api); [[ -n $cid && $(health "$cid") == healthy ]] && break; sleep 1
done
r=$(http GET /ready)
log "api container recreated, healthy again in $((SECONDS - t)) s; GET /ready -> $(status_of "$r") $(body_of "$r" | jq -c .checks)"
[[ $(status_of "$r") == 200 ]] || die "/ready after recreating the api container"
log "api runs as: $(dc exec -T api id)"

# --- flower -----------------------------------------------------------------------------------------------
if [[ ${E2E_FLOWER:-1} == 1 ]]; then
  r=$(curl -s -w ' HTTP %{http_code}' "http://127.0.0.1:$CONVLENS_FLOWER_PUBLISH/healthcheck") || true
  log "flower GET /healthcheck -> $r"
  [[ $r == *"HTTP 200" ]] || die "flower"
  r=$(curl -s "http://127.0.0.1:$CONVLENS_FLOWER_PUBLISH/metrics" | grep -E '^flower_(worker_online|events_total)' | tr '\n' ' ') || true
  log "flower GET /metrics -> ${r:-nothing}"
fi

# --- summary ----------------------------------------------------------------------------------------------
log "volumes: $(docker volume ls -q | grep "^${PROJECT}_" | tr '\n' ' ')"
log "images:"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' \
  | grep -E "^(${CONVLENS_IMAGE%%:*}|python|redis|mher/flower):" | sed 's/^/    /'
for k in "${!TIMES[@]}"; do printf '    %-14s %5d s\n' "$k" "${TIMES[$k]}"; done | sort
log "PASSED in $((SECONDS - T_START)) s"
