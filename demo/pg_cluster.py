"""A throwaway PostgreSQL cluster for tests, the demo and the benchmark.

`PgCluster(...).start()` runs initdb + pg_ctl in a fresh temp dir on a free 127.0.0.1 port. When
running as root it runs the server as `nobody` (PostgreSQL refuses root). pg_hba gives every login
role its own method so one cluster tests them all:

    gw_scram  scram-sha-256 (host: plaintext or TLS)   gw_md5   md5
    gw_trust  trust                                    gw_tls   scram-sha-256, hostssl only

With `ssl=True` the server gets a self-signed certificate (`cert_path`, usable as a root cert).
`sample_data()` creates the sample tables the tests and the demo use. No pytest dependency.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PASSWORDS = {"gw_scram": "scram-pw-7Qx", "gw_md5": "md5-pw-3Lk", "gw_tls": "tls-pw-9Zr",
             "gw_trust": None}

DEFAULT_HBA = """\
local   all       all                      trust
host    all       postgres   127.0.0.1/32  trust
host    all       gw_trust   127.0.0.1/32  trust
host    all       gw_md5     127.0.0.1/32  md5
hostssl all       gw_tls     127.0.0.1/32  scram-sha-256
host    all       gw_scram   127.0.0.1/32  scram-sha-256
"""

SAMPLE_SQL = """
CREATE TABLE customers (
  id serial PRIMARY KEY, name text NOT NULL, email text, ssn text, card text, notes text,
  created date DEFAULT DATE '2024-01-02');
INSERT INTO customers (name, email, ssn, card, notes) VALUES
  ('Ada Lovelace', 'ada@example.com', '123-45-6789', '4111111111111111', 'vip'),
  ('Alan Turing', 'alan@example.com', '987-65-4321', '5500005555555559', 'call 555-867-5309'),
  ('Grace Hopper', 'grace@example.com', '111-22-3333', '340000000000009', NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers(id),
  amount numeric(10,2), status text);
INSERT INTO orders (customer_id, amount, status) VALUES (1, 10.50, 'paid'), (2, 99.99, 'open'),
  (3, 5.00, 'paid');
CREATE VIEW customer_contacts AS SELECT id, name, ssn AS tax_id, lower(email) AS mail
  FROM customers;
CREATE TABLE audit_trail (id serial PRIMARY KEY, note text);
GRANT ALL ON ALL TABLES IN SCHEMA public TO gw_scram, gw_md5, gw_trust, gw_tls;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO gw_scram, gw_md5, gw_trust, gw_tls;
GRANT CREATE ON SCHEMA public TO gw_scram, gw_md5, gw_trust, gw_tls;
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").exists():
            return cand
    return None


def available() -> bool:
    return pg_bindir() is not None and shutil.which("psql") is not None


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class PgCluster:
    def __init__(self, *, ssl: bool = False, hba: str = DEFAULT_HBA, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.ssl = ssl
        self.hba = hba
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = settings or {}
        self.dir = Path(tempfile.mkdtemp(prefix="portcullis-pg-"))
        self.data = self.dir / "data"
        self.cert_path: Path | None = None
        self.as_nobody = os.geteuid() == 0
        self.started = False

    # -- process helpers
    def _run(self, *args: str | Path, check: bool = True, timeout: float = 60) -> str:
        cmd = [str(a) for a in args]
        if self.as_nobody:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=self.dir)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def start(self) -> PgCluster:
        if self.as_nobody:
            os.chown(self.dir, 65534, 65534)
        self._run(self.bindir / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "password_encryption": "'scram-sha-256'",
        }
        if self.ssl:
            cert, key = _self_signed(self.dir)
            if self.as_nobody:
                for p in (cert, key):
                    os.chown(p, 65534, 65534)
            self.cert_path = cert
            conf.update(ssl="on", ssl_cert_file=f"'{cert}'", ssl_key_file=f"'{key}'")
        conf.update(self.settings)
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n".join(f"{k} = {v}" for k, v in conf.items()) + "\n")
        (self.data / "pg_hba.conf").write_text(self.hba)
        if self.as_nobody:
            os.chown(self.data / "pg_hba.conf", 65534, 65534)
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-w",
                  "-t", "60", "start")
        self.started = True
        self.create_roles()
        return self

    def stop(self) -> None:
        if self.started:
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop",
                      check=False)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- SQL as the superuser over the Unix socket
    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> str:
        cmd = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p",
               str(self.port), "-U", "postgres", "-d", db, "-c", sql]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"psql failed: {res.stderr}")
        return res.stdout

    def create_roles(self) -> None:
        stmts = []
        for role, pw in PASSWORDS.items():
            if pw is None:
                stmts.append(f"CREATE ROLE {role} LOGIN")
            elif role == "gw_md5":
                stmts.append("SET password_encryption = 'md5'")
                stmts.append(f"CREATE ROLE {role} LOGIN PASSWORD '{pw}'")
                stmts.append("SET password_encryption = 'scram-sha-256'")
            else:
                stmts.append(f"CREATE ROLE {role} LOGIN PASSWORD '{pw}'")
        self.psql("; ".join(stmts))

    def create_database(self, name: str, sample: bool = True) -> None:
        self.psql(f'CREATE DATABASE "{name}"')
        if sample:
            self.psql(SAMPLE_SQL, db=name)

    def dsn(self, user: str = "postgres", db: str = "postgres") -> str:
        pw = PASSWORDS.get(user)
        auth = f" password={pw}" if pw else ""
        return f"host=127.0.0.1 port={self.port} user={user} dbname={db}{auth}"

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""


def wait_port(host: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not listening")
