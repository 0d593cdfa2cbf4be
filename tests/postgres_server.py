"""A throwaway PostgreSQL server for tests: a cluster made by `initdb` in a temporary
directory, listening on 127.0.0.1 only, its unix socket in that directory; stopped and
removed at the end.

    server = PostgresServer.create()   # raises PostgresMissing without the binaries
    url = server.create_database()     # a fresh database: postgresql://...
    server.crash(); server.start()     # kill it as a power cut would, and start it again
    server.destroy()

Rules: postgres takes no port 0, so a free port is picked by binding a socket first
(and another one tried if something took it meanwhile); the port stays the same across
restarts, so URLs stay valid. As root, `initdb` refuses to run: the cluster is then
owned and run by the `postgres` system user (`runuser`), in a directory it owns.
Passwords are checked (scram-sha-256), so a test can tell that one never leaks.
`fsync=off`: the tests crash the server process, never the machine, and the kernel
keeps what was written. Databases use an ICU locale where collation differs from the
bytes ("a" before "B"), when the server has ICU, so ordering that forgets its "C"
collation shows.

Every command is bounded (COMMAND_TIMEOUT_S); a failure raises RuntimeError with the
server's log.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "postgres"
PASSWORD = "pg-test-secret-DO-NOT-LEAK"
# initdb, pg_ctl start and stop on a loaded CI box: seconds; generous.
COMMAND_TIMEOUT_S = 60
_SYSTEM_USER = "postgres"  # who runs the cluster when the tests run as root


class PostgresMissing(Exception):
    """No PostgreSQL server binaries here, or no user that may run them."""


def find_bin_dir() -> Path | None:
    """The directory of `initdb`, `pg_ctl` and `postgres`: Debian's newest
    /usr/lib/postgresql/N/bin, else wherever PATH has them."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """One cluster and its postgres process (see the module docstring)."""

    def __init__(self, bin_dir: Path, root: Path, run_as: list[str]) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self.running = False
        self._run_as = run_as
        self._databases = itertools.count(1)
        self.icu = False

    @classmethod
    def create(cls) -> PostgresServer:
        """initdb and start a new cluster. Raises PostgresMissing or RuntimeError."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresMissing("no PostgreSQL server binaries (initdb, pg_ctl, postgres)")
        root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(_SYSTEM_USER)
            except KeyError:
                shutil.rmtree(root)
                raise PostgresMissing(f"running as root and no {_SYSTEM_USER!r} user") from None
            os.chown(root, owner.pw_uid, owner.pw_gid)
            run_as = ["runuser", "-u", _SYSTEM_USER, "--"]
        server = cls(bin_dir, root, run_as)
        try:
            server._initdb()
            server._start_on_a_free_port()
            server.icu = server._has_icu()
        except BaseException:
            server.destroy()
            raise
        return server

    def url(self, dbname: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """A new, empty database (ICU-collated when the server can); its URL."""
        name = f"test_{next(self._databases)}"
        locale = "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'" if self.icu else ""
        with self.admin() as admin:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' {locale}")
        return self.url(name)

    def start(self) -> None:
        """Start the cluster on its port. Raises RuntimeError if it does not come up."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off"
        )
        self._pg_ctl("start", "-l", str(self.log), "-o", options)
        self.running = True

    def stop(self) -> None:
        """A clean shutdown: connections are ended, everything is written."""
        self._pg_ctl("stop", "-m", "fast")
        self.running = False

    def crash(self) -> None:
        """Stop as a crash would (`-m immediate`: no checkpoint); the next start
        recovers from the WAL."""
        self._pg_ctl("stop", "-m", "immediate")
        self.running = False

    def destroy(self) -> None:
        if self.running:
            try:
                self._pg_ctl("stop", "-m", "immediate")
            finally:
                self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ plumbing

    def _initdb(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        if self._run_as:
            owner = pwd.getpwnam(_SYSTEM_USER)
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )

    def _start_on_a_free_port(self) -> None:
        for attempt in range(3):
            self.port = _free_port()
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == 2:  # not a port taken between the probe and the start
                    raise

    def _has_icu(self) -> bool:
        with self.admin() as admin:
            row = admin.execute("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")
            count = row.fetchone()
        return count is not None and int(str(count[0])) > 0

    def _pg_ctl(self, *arguments: str) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-t",
            str(COMMAND_TIMEOUT_S // 2),
            *arguments,
        )

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self._run_as, *command],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{Path(command[0]).name} {command[1:]} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{log}"
            )
