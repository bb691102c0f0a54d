#!/usr/bin/env bash
# Build the step images. Usage: containers/build.sh [cpu|cuda|all] [--smoke]
#   cpu   FROM a Debian bookworm base (python3.11); built locally with debootstrap when it is missing
#   cuda  FROM $CUDA_BASE_IMAGE (needs a registry to pull from); torch comes as the CUDA build from PyPI
#   --smoke  run `cmce --help` and an import (the server's too) + PNG-decode check inside each built image
# Env: CONTAINER_TOOL (podman|docker), CPU_BASE_IMAGE, CUDA_BASE_IMAGE, IMAGE_PREFIX (default localhost/cmce)
set -euo pipefail
cd "$(dirname "$0")/.."
target= smoke=
for arg in "$@"; do  # --smoke in either place: `build.sh --smoke` took it for the target
  case "$arg" in
    --smoke) smoke=--smoke ;;
    *) [ -z "$target" ] || { echo "usage: $0 [cpu|cuda|all] [--smoke] (one target)" >&2; exit 2; }; target=$arg ;;
  esac
done
target=${target:-cpu}
tool=${CONTAINER_TOOL:-$(command -v podman || command -v docker || true)}
[ -n "$tool" ] || { echo "build.sh: neither podman nor docker found" >&2; exit 2; }
prefix=${IMAGE_PREFIX:-localhost/cmce}
cpu_base=${CPU_BASE_IMAGE:-localhost/base:bookworm}
cuda_base=${CUDA_BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04}

decode_check='import faiss, numpy as np, onnxruntime, torch; from cmce.data.codec import decode_png_fast, encode_png
import cmce.serving.app, prometheus_client, uvicorn  # the server (deploy/serve.yaml runs it from this image)
assert decode_png_fast(encode_png(np.full((4, 4), 7, np.uint8)), 1, 4).sum() == 7 * 16'

mounts=()
# pip inside the build trusts the host's CA bundle, and finds a local torch wheel when the host has one
[ -f /etc/ssl/certs/ca-certificates.crt ] && mounts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ] && mounts+=(--volume "$PIP_FIND_LINKS:/wheels:ro")

ensure_cpu_base() {
  if "$tool" image exists "$cpu_base" 2>/dev/null || "$tool" image inspect "$cpu_base" >/dev/null 2>&1; then return; fi
  [ "$cpu_base" = localhost/base:bookworm ] || { echo "build.sh: base image $cpu_base not found" >&2; exit 2; }
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
  rootfs=$(mktemp -d)
  echo "building $cpu_base with debootstrap from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | "$tool" import - "$cpu_base" >/dev/null
  rm -rf "$rootfs"
}

build() {  # build NAME BASE
  local start=$SECONDS
  "$tool" build "${mounts[@]}" --build-arg BASE_IMAGE="$2" --build-arg GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null)" \
    -f containers/Dockerfile -t "$prefix:$1" .
  echo "built $prefix:$1 in $((SECONDS - start)) s"
  if [ "$smoke" = --smoke ]; then
    "$tool" run --rm "$prefix:$1" cmce --help >/dev/null && echo "$prefix:$1: cmce --help OK"
    # the image's native libraries load (torch, faiss, OpenCV's libpng) and a PNG decodes on the fast path
    "$tool" run --rm "$prefix:$1" python -c "$decode_check" && echo "$prefix:$1: imports and PNG decoding OK"
  fi
}

case "$target" in
  cpu) ensure_cpu_base; build cpu "$cpu_base" ;;
  cuda) build cuda "$cuda_base" ;;
  all) ensure_cpu_base; build cpu "$cpu_base"; build cuda "$cuda_base" ;;
  *) echo "usage: $0 [cpu|cuda|all] [--smoke]" >&2; exit 2 ;;
esac
