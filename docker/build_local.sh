#!/usr/bin/env bash
# Build the ganet-serve image without Docker or a registry: podman (chroot isolation, host network) on top of a
# Debian bookworm base made here with debootstrap. Idempotent: the base is made and imported once.
#
#   docker/build_local.sh                 # -> localhost/ganet-serve:latest
#   IMAGE=localhost/ganet-serve:dev docker/build_local.sh --build-arg ORT_PACKAGE=onnxruntime-gpu
#
# Extra arguments go to `podman build`. Needs root (debootstrap, rootful podman); installs podman, buildah, runc
# and debootstrap with apt when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_DIR=${GANET_BASE_DIR:-/var/tmp/ganet-base}          # the debootstrap tarball is cached here
BASE_IMAGE=${GANET_BASE_IMAGE:-localhost/ganet-base:bookworm}
IMAGE=${IMAGE:-localhost/ganet-serve:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[build_local] %s\n' "$*" >&2; }

missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 1. The base: Debian bookworm (python3 is 3.11, as ganet needs) with python3-venv, made once.
if [[ ! -f $BASE_DIR/rootfs.tar ]]; then
    log "debootstrap bookworm into $BASE_DIR (once, about a minute)"
    mkdir -p "$BASE_DIR"
    rm -rf "$BASE_DIR/rootfs.tmp"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$BASE_DIR/rootfs.tmp" "$MIRROR" >"$BASE_DIR/debootstrap.log"
    # Trust what this host trusts (an HTTPS-intercepting egress proxy's CA, say), so pip inside the build works.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$BASE_DIR/rootfs.tmp/usr/local/share/ca-certificates/"
        chroot "$BASE_DIR/rootfs.tmp" update-ca-certificates >/dev/null
    fi
    rm -rf "$BASE_DIR"/rootfs.tmp/var/lib/apt/lists/* "$BASE_DIR"/rootfs.tmp/var/cache/apt/*
    tar -C "$BASE_DIR/rootfs.tmp" -cf "$BASE_DIR/rootfs.tar.tmp" .
    mv "$BASE_DIR/rootfs.tar.tmp" "$BASE_DIR/rootfs.tar"
    rm -rf "$BASE_DIR/rootfs.tmp"
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true  # a new tarball replaces an older import
fi

# 2. Import it as a local image (no registry involved).
if ! podman image exists "$BASE_IMAGE"; then
    log "importing $BASE_DIR/rootfs.tar as $BASE_IMAGE"
    podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$BASE_DIR/rootfs.tar" "$BASE_IMAGE" >/dev/null
fi

# 3. The image. chroot isolation + host network: no cgroups or network namespaces needed on the build host.
# --format docker keeps HEALTHCHECK and STOPSIGNAL (the OCI image format has no HEALTHCHECK).
log "building $IMAGE from docker/Dockerfile on $BASE_IMAGE"
podman build --isolation chroot --network host --format docker --pull=never \
    -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$@" .

size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
log "built $IMAGE ($((size / 1000000)) MB)"
cat >&2 <<EOF
next (rootful podman on this VM: runc, because crun refuses the hybrid cgroup layout; nofile/nproc limits below
podman's defaults, which the VM does not let a container set; no systemd to schedule the healthcheck):
  podman --runtime runc run --rm -p 8000:8000 --no-healthcheck --ulimit nofile=8192:8192 \\
      --ulimit nproc=8192:8192 -v EXPORT_DIR:/models/model:ro $IMAGE
end to end (ready, /classify on a photograph, the HEALTHCHECK command, non-root, SIGTERM -> exit 0):
  python3 docker/smoke_test.py EXPORT_DIR --image $IMAGE --engine "podman --runtime runc" \\
      --run-args "--no-healthcheck --ulimit nofile=8192:8192 --ulimit nproc=8192:8192"
EOF
