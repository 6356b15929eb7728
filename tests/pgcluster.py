"""A throwaway PostgreSQL cluster on loopback, for the unit tests and the benchmarks.

initdb in a private folder, scram-sha-256 for every login, reached the way cron
reaches a server: libpq environment plus a passfile, never a password on argv.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

PG_VERSION = os.environ.get("PGBACKUP_TEST_PG_VERSION", "15")
PG_BIN = f"/usr/lib/postgresql/{PG_VERSION}/bin"


def as_cluster_owner(argv, check=True, **kwargs):
    """initdb and postgres refuse to run as root: run them as the postgres user then."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kwargs)


def write_ca_and_server_certificate(folder: str, ca_name: str = "pgbackup test CA") -> dict:
    """A throwaway CA and a server certificate it issued for localhost and 127.0.0.1, so
    clients connect as on a real host: sslmode=verify-full against the CA, not against
    a self-signed server certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, issuer, public_key, signing_key, ca: bool, names=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate("localhost", ca_name, server_key.public_key(), ca_key, ca=False, names=names)
    paths = {name: os.path.join(folder, name) for name in ("ca.crt", "server.crt", "server.key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca.crt"], "wb") as handle:
        handle.write(ca.public_bytes(pem))
    with open(paths["server.crt"], "wb") as handle:
        handle.write(server.public_bytes(pem))
    with open(os.open(paths["server.key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(
            server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TempCluster:
    def __init__(self, base: str | None = None, settings: dict | None = None):
        if not os.path.exists(f"{PG_BIN}/initdb"):
            raise RuntimeError(
                f"PostgreSQL {PG_VERSION} server binaries are missing in {PG_BIN}: run `make deps`"
            )
        self.base = base or tempfile.mkdtemp(prefix="pgbackup-cluster-")
        self.data = os.path.join(self.base, "data")
        self.socket_dir = os.path.join(self.base, "socket")
        self.passfile = os.path.join(self.base, "pgpass")
        self.settings = {"listen_addresses": "127.0.0.1", "max_connections": "50", **(settings or {})}
        self.port = free_port()
        self.password = None
        self.env = {}

    def _chown(self, *paths):
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in paths:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def start(self) -> TempCluster:
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.makedirs(self.socket_dir, exist_ok=True)
        self._chown(self.base, self.socket_dir)
        password_path = os.path.join(self.base, "password")
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            self.password = "cluster-" + uuid.uuid4().hex
            pwfile = os.path.join(self.base, "pw")
            with open(pwfile, "w") as handle:
                handle.write(self.password)
            self._chown(pwfile)
            as_cluster_owner(
                [
                    f"{PG_BIN}/initdb",
                    "-D",
                    self.data,
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--data-checksums",
                ]
            )
            os.unlink(pwfile)
            with open(password_path, "w") as handle:
                handle.write(self.password)
            os.chmod(password_path, 0o600)
        else:
            with open(password_path) as handle:
                self.password = handle.read()
        tls = write_ca_and_server_certificate(self.base)
        self._chown(tls["server.key"])
        settings = {
            **self.settings,
            "ssl": "on",
            "ssl_cert_file": tls["server.crt"],
            "ssl_key_file": tls["server.key"],
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        as_cluster_owner(
            [
                f"{PG_BIN}/pg_ctl",
                "-D",
                self.data,
                "-l",
                os.path.join(self.base, "server.log"),
                "-w",
                "start",
                "-o",
                f"-p {self.port} -k {self.socket_dir} {options}",
            ]
        )
        with open(self.passfile, "w") as handle:
            # Any host name: clients may name the server as its certificate does.
            handle.write(f"*:{self.port}:*:postgres:{self.password}\n")
        os.chmod(self.passfile, 0o600)
        self.env = {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGPASSFILE": self.passfile,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": tls["ca.crt"],
            "PGBACKUP_PG_BIN": PG_BIN,
        }
        return self

    def stop(self, remove: bool = True):
        as_cluster_owner([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "fast", "stop"])
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
