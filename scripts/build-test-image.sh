#!/usr/bin/env bash
# Build the Molecule test image locally: Debian 12 with systemd as PID 1 and python3.
# No image registry is reachable from the lab, so the root filesystem comes from
# debootstrap, using the Debian mirror this host already trusts (its apt sources),
# and is loaded with `docker import`. Set TEST_IMAGE_DOCKERFILE=1 to build from
# molecule/_shared/Dockerfile instead where a registry is reachable.
set -euo pipefail

image="${TEST_IMAGE:-pgbackup-test:bookworm}"
here="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${TEST_IMAGE_DOCKERFILE:-0}" = "1" ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$here/molecule/_shared/ca-certificates.crt"
    exec docker build -t "$image" "$here/molecule/_shared"
fi

# The first Debian mirror named in the host's apt sources (deb822 or one-line form).
host_mirror() {
    local uri
    uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | grep -v -- '-security' | awk '{print $2}' | head -n1 || true)
    fi
    [ -n "$uri" ] || { echo "build-test-image: no Debian mirror found in /etc/apt/sources*" >&2; exit 1; }
    echo "$uri"
}

mirror="$(host_mirror)"
security_mirror="$(grep -hE '^URIs:.*-security' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -n1 || true)"
rootfs="$(mktemp -d /var/tmp/pgbackup-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "build-test-image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates,sudo,procps,iproute2,locales-all,gnupg \
    bookworm "$rootfs" "$mirror" >/var/tmp/pgbackup-debootstrap.log 2>&1 \
    || { tail -n 30 /var/tmp/pgbackup-debootstrap.log >&2; exit 1; }

# Containers reach the same mirror; pip inside them needs the host's CA bundle.
{
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    [ -z "$security_mirror" ] || echo "deb $security_mirror bookworm-security main"
} > "$rootfs/etc/apt/sources.list"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"

# systemd in a container: no gettys, no udev, no remounting of /, no hardware units.
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-remount-fs.service systemd-firstboot.service sys-kernel-debug.mount \
            systemd-logind.service; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
: > "$rootfs/etc/machine-id"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# An empty package list must look stale, so that apt's cache_valid_time refreshes it.
touch -d @0 "$rootfs/var/lib/apt/lists"

echo "build-test-image: importing as $image"
tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --change 'ENV container=docker' \
    - "$image" >/dev/null
echo "build-test-image: done"
