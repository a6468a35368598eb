"""Postgres gateway throughput: pgbench -S through the gateway, direct, and through pgbouncer,
measured in the same run, printed as TPS and ratios.

    .venv/bin/python bench/postgres.py [--seconds 10] [--scale 10] [--clients 1,8]
                                       [--modes simple,prepared] [--profile DIR]

`--profile DIR` samples the gateway process with py-spy (`pip install py-spy` into the venv;
not a project dependency) during each gateway run and writes DIR/<mode>-c<N>.txt (collapsed
stacks) plus DIR/<mode>-c<N>.top.txt (self and total time per function).

A throwaway PostgreSQL (tests/fixtures/pg_cluster.py) is initialised with `pgbench -i`; the real
gateway process (`python -m addons.cli run`) fronts it with a policy that allows the benchmark's
SELECTs and has masks loaded: a `columns:` mask that applies to every statement of the target
(so every result's columns are resolved and checked) and a detector mask on another table.
Every statement is decided and audited (hash-chained audit line per decision and outcome).
pgbouncer (session pooling) is the reference proxy; when it is not installed the script tries
`apt-get install pgbouncer` and otherwise skips that column with a message.

Goal at c=8: gateway >= 0.5x direct and >= 0.75x pgbouncer, for -M simple and -M prepared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.pg_cluster import PASSWORDS, PgCluster, free_port, wait_port  # noqa: E402

USER = "gw_scram"
POLICY = """
rules:
  - id: bench-read
    effect: allow
    reason: pgbench -S reads accounts
    when: {targets: [bench-db], sql: {statements: [select, transaction, set, show]}}
masks:
  - id: bench-pii
    when: {targets: [bench-db]}
    columns: ["*.ssn", "customers.card"]
    strategy: redact
  - id: bench-contacts
    when: {sql: {tables: [public.customers]}}
    detectors: [email, credit_card]
"""


def sh(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}")
    return res


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("bench: pgbouncer not found, trying apt-get install pgbouncer ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = sh(["apt-get", "install", "-y", "-qq", "pgbouncer"], env=env, check=False)
    if res.returncode != 0:
        sh(["apt-get", "update", "-qq"], env=env, check=False)
        sh(["apt-get", "install", "-y", "-qq", "pgbouncer"], env=env, check=False)
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)


class Bouncer:
    def __init__(self, binary: str, pg: PgCluster, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        ini = workdir / "pgbouncer.ini"
        users = workdir / "userlist.txt"
        users.write_text(f'"{USER}" "{PASSWORDS[USER]}"\n')
        ini.write_text(f"""[databases]
bench = host=127.0.0.1 port={pg.port} dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {users}
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
""")
        cmd = [binary, str(ini)]
        if os.geteuid() == 0:
            for p in (workdir, ini, users):
                os.chown(p, 65534, 65534)
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port)
        except TimeoutError:
            log = workdir / "pgbouncer.log"
            raise RuntimeError("pgbouncer did not start: " + (
                log.read_text() if log.exists() else "no log")) from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Gateway:
    def __init__(self, pg: PgCluster, workdir: Path) -> None:
        import yaml

        from addons.identity import DevIssuer

        self.port = free_port()
        pol = workdir / "policies"
        pol.mkdir()
        (pol / "bench.yaml").write_text(POLICY)
        cfg = {"state_dir": str(workdir / "state"), "policies": str(pol),
               "listen": {"postgres": f"127.0.0.1:{self.port}"},
               "identity": {"dev_issuer": True},
               "targets": [{"name": "bench-db", "protocol": "postgres", "database": "bench",
                            "upstream": {"host": "127.0.0.1", "port": pg.port,
                                         "dbname": "bench", "user": USER,
                                         "password_env": "BENCH_DB_PASSWORD",
                                         "sslmode": "disable"}}]}
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "BENCH_DB_PASSWORD": PASSWORDS[USER]}
        self.log = (workdir / "gateway.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "addons.cli", "run", "--config", str(path)], cwd=ROOT,
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port("127.0.0.1", self.port, timeout=60)
        self.token = DevIssuer(workdir / "state").token("bench-agent", ["bench"], 3600)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def pgbench(port: int, password: str, mode: str, clients: int, seconds: int) -> float:
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable"}
    threads = min(clients, max(1, os.cpu_count() or 1))
    res = sh(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-S", "-M", mode,
              "-n", "-c", str(clients), "-j", str(threads), "-T", str(seconds), "bench"],
             env=env, timeout=seconds + 120)
    m = re.search(r"tps = ([0-9.]+)", res.stdout)
    if not m:
        raise RuntimeError(f"no tps in pgbench output:\n{res.stdout}\n{res.stderr}")
    return float(m.group(1))


def profiled(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--nonblocking", "-r", "250", "-p", str(pid),
                             "-d", str(seconds), "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(raw: Path, top: int = 40) -> None:
    """Self and total samples per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    lines = [f"{samples} samples"]
    for title, table in (("self", own), ("total", total)):
        lines.append(f"\n-- {title}")
        for f, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * n / max(samples, 1):6.1f}%  {f}")
    raw.with_suffix(".top.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument("--profile", type=Path, default=None,
                    help="sample the gateway with py-spy during its runs, write stacks here")
    args = ap.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if not shutil.which("pgbench"):
        print("bench: pgbench not found (apt-get install postgresql-client)", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    work.chmod(0o755)  # pgbouncer runs as nobody when we are root
    pg = PgCluster(settings={"max_connections": "200"}).start()
    bouncer = gw = None
    try:
        pg.create_database("bench", sample=False)
        sh(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", str(pg.dir), "-p", str(pg.port),
            "-U", "postgres", "bench"])
        pg.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {USER}", db="bench")
        binary = find_pgbouncer()
        if binary:
            bdir = work / "bouncer"
            bdir.mkdir()
            bouncer = Bouncer(binary, pg, bdir)
        else:
            print("bench: pgbouncer could not be installed; its column is skipped")
        gdir = work / "gateway"
        gdir.mkdir()
        gw = Gateway(pg, gdir)
        routes = [("direct", pg.port, PASSWORDS[USER]), ("gateway", gw.port, gw.token)]
        if bouncer:
            routes.append(("pgbouncer", bouncer.port, PASSWORDS[USER]))
        pgbench(gw.port, gw.token, "simple", 1, 2)  # warm-up: catalog cache, imports
        print(f"pgbench -S, scale {args.scale}, {args.seconds} s per run, "
              f"{os.cpu_count()} CPUs (server, proxy and pgbench share them)\n")
        head = f"{'mode':9} {'c':>2}  " + "  ".join(f"{n:>10}" for n, _, _ in routes)
        head += "  gw/direct" + ("  gw/pgbouncer" if bouncer else "")
        print(head)
        verdicts = []
        for mode in args.modes.split(","):
            for c in clients:
                tps = {}
                for name, port, pw in routes:
                    spy = None
                    if args.profile and name == "gateway":
                        out = args.profile / f"{mode}-c{c}.txt"
                        spy = profiled(gw.proc.pid, out, args.seconds)
                    tps[name] = pgbench(port, pw, mode, c, args.seconds)
                    if spy is not None:
                        spy.wait(30)
                        summarise(out)
                line = f"{mode:9} {c:>2}  " + "  ".join(f"{tps[n]:>10.0f}" for n, _, _ in routes)
                r_direct = tps["gateway"] / tps["direct"]
                line += f"  {r_direct:>9.2f}"
                if bouncer:
                    r_bouncer = tps["gateway"] / tps["pgbouncer"]
                    line += f"  {r_bouncer:>13.2f}"
                print(line, flush=True)
                if c == max(clients):
                    ok = r_direct >= 0.5 and (not bouncer or r_bouncer >= 0.75)
                    verdicts.append((mode, c, ok))
        print()
        for mode, c, ok in verdicts:
            print(f"goal at c={c}, -M {mode}: {'met' if ok else 'NOT met'} "
                  "(>= 0.5x direct, >= 0.75x pgbouncer)")
        audit = (gdir / "state" / "audit.jsonl")
        if audit.exists():
            with audit.open("rb") as fh:
                lines = sum(1 for _ in fh)
            print(f"audit lines written by the gateway during the run: {lines}")
        return 0
    finally:
        if gw:
            gw.stop()
        if bouncer:
            bouncer.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"(total {time.monotonic() - t0:.0f} s)")
    sys.exit(rc)
