#!/usr/bin/env bash
# Install the host packages the lab and the tests need, when running as root and they
# are missing. Idempotent: prints nothing and changes nothing when all are present.
set -euo pipefail

packages=(
    docker.io debootstrap                    # the Molecule lab: daemon and image build
    postgresql-15 postgresql-client-15       # the real PostgreSQL the unit tests start
    python3-venv rsync zstd                  # venv; Molecule's file copies; bench peer
    gnupg openssl rclone pgbackrest          # bench peers and the off-site remote
    python3-cryptography python3-zstandard python3-psycopg   # pgbackup as hosts run it, with Debian's libraries
)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run as root or install them" >&2
    exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The server package would start a cluster through systemd; there is none on the host.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/var/tmp/pgbackup-apt.log 2>&1 \
    || { tail -n 30 /var/tmp/pgbackup-apt.log >&2; exit 1; }
