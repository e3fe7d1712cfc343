#!/usr/bin/env bash
# The README's figures, made by the service itself: start `convlens serve` on a free port over an empty run
# store (so it serves the shipped model), ask each endpoint for its PNG, stop the server by its PID.
#
#   scripts/readme_figures.sh [DATA_DIR]      # default var/data (the gallery and /topk need CIFAR-10)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-var/data}
OUT=docs/figures
HOME_DIR=$(mktemp -d)
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
CONVLENS_HOME=$HOME_DIR CONVLENS_DATA_DIR=$DATA CONVLENS_PORT=$PORT CONVLENS_EMBEDDED_WORKER=false \
  .venv/bin/convlens serve >"$HOME_DIR/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$HOME_DIR"' EXIT
for _ in $(seq 300); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
mkdir -p "$OUT"
IMG=$HOME_DIR/input.png
curl -sf -o "$IMG" "$URL/gallery/${FIGURE_IMAGE:-12}.png"           # a CIFAR-10 test image
cp "$IMG" "$OUT/input.png"
get() { curl -sf -o "$OUT/$1" "$URL$2"; echo "$OUT/$1"; }
post() { curl -sf -o "$OUT/$1" -F "file=@$IMG" "$URL$2"; echo "$OUT/$1"; }
get filters-channels.png "/filters?layer=conv1&method=channels"
get filters-rgb.png "/filters?layer=conv1&method=rgb&scale=6"
post featuremaps-conv1.png "/featuremaps?layer=conv1&channels=all"
post reconstruct-conv1.png "/reconstruct?layer=conv1&channels=all"
post reconstruct-layer4.png "/reconstruct?layer=layer4&channels=top:15&scale=3"
post explain-all.png "/explain?method=all"
get confusion.png "/models/convlens-resnet18-cifar10/confusion.png"
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/topk?layer=layer4")" = 200 ]; do sleep 1; done
get topk-layer4.png "/topk?layer=layer4&channel=${FIGURE_CHANNEL:-7}&k=9&format=png&tile=48"

# The two shipped models side by side on the same image: conv1's filters, layer1's maps, projections of the
# deepest layer, Grad-CAM at each model's own cam_layer (GET /models/{id}).
for M in convlens-resnet18-cifar10 convlens-resnet18-cifarstem-cifar10; do
  get "side-$M-filters.png" "/filters?layer=conv1&method=rgb&scale=6&model=$M"
  post "side-$M-featuremaps.png" "/featuremaps?layer=layer1&channels=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15&scale=3&model=$M"
  post "side-$M-reconstruct.png" "/reconstruct?layer=layer4&channels=top:8&scale=3&model=$M"
  post "side-$M-gradcam.png" "/explain?method=gradcam&view=overlay&size=192&model=$M"
done

# The two shipped models compared on all 10,000 test images (minutes on a CPU: every image through both), and
# the figures the README quotes from the same report (cached by the server, so the second request is instant).
PAIR="models=convlens-resnet18-cifar10,convlens-resnet18-cifarstem-cifar10&split=test"
# 202 while the pair is computed; any other answer ends the wait, and `get` (curl -f, set -e) stops on an error.
while [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/compare?$PAIR&format=json")" = 202 ]; do sleep 5; done
get compare-shipped.png "/compare?$PAIR&format=png"
curl -sf "$URL/compare?$PAIR&format=json" | .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
acc = r["accuracy"]
print("compare: a %.4f  b %.4f  agreement %.4f  table %s" % (acc["a"], acc["b"], r["agreement"], r["table"]))
for d in sorted(r["per_class"], key=lambda d: d["a"] - d["b"]):  # every class, largest gain of b first
    print("  %s: b - a = %+.1f points" % (d["class"], 100 * (d["b"] - d["a"])))'
