#!/bin/sh
# Build a densemap image with the first container engine that works here (docker with a
# running daemon, podman, buildah) and print its size.  make image  runs it.
#   deploy/build-image.sh TAG [EXTRAS]       e.g.  deploy/build-image.sh densemap-ray:0.1.0 cluster
set -eu
tag=${1:?usage: deploy/build-image.sh TAG [EXTRAS]}
extras=${2:-}
cd "$(dirname "$0")/.."
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
elif command -v podman >/dev/null 2>&1; then
    engine=podman
elif command -v buildah >/dev/null 2>&1; then
    engine=buildah
else
    echo "make image: no container engine here (docker with a running daemon, podman or buildah)" >&2
    exit 3
fi
echo "building $tag with $engine (EXTRAS='$extras')"
$engine build -f deploy/Dockerfile --build-arg "EXTRAS=$extras" -t "$tag" .
case $engine in
    buildah) size=$(buildah images --format '{{.Size}}' "$tag") ;;
    *) size=$($engine image inspect --format '{{.Size}}' "$tag") ;;
esac
echo "image $tag: $size"
