"""A real PostgreSQL server for the tests, started on a free port in a folder of its own.

PostgreSQL refuses to run as root, so when the tests run as root (CI does) the server runs as an
unprivileged user: Debian's ``postgres`` account when the package created it, else ``nobody``.
Each test gets a database of its own (``CREATE DATABASE``), dropped afterwards; one server serves
the whole session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import children, free_port, proc_stat

SUPERUSER = "llmproxy_test"


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def _run_as() -> str | None:
    """The user to run the server as, or None to run it as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


def _stop(pid: int) -> None:
    """SIGSTOP ``pid``, and wait until it is stopped (or gone)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while (stat := proc_stat(pid)) is not None and stat[0] not in ("T", "t", "Z"):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


@dataclass
class PostgresServer:
    """One ``postgres`` process; :meth:`database` hands out fresh databases on it."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llm-proxy-pg-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        binaries = server_binaries()
        if binaries is None:
            raise RuntimeError(
                "PostgreSQL is not installed (scripts/ensure-services.sh installs it)"
            )
        user = _run_as()
        if user is not None:
            # mkdtemp made the folder 0700 for root: hand it to the server's user.
            account = pwd.getpwnam(user)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        if not self.data.exists():
            subprocess.run(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
                check=True,
                capture_output=True,
                user=user,
                cwd=self.root,
            )
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(binaries / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                # A test server: durability buys nothing and costs seconds.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            user=user,
            cwd=self.root,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log_tail()}")
            if self.psql("postgres", "SELECT 1", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not start in {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def psql(
        self, database: str, sql: str, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    def stop(self, *, fast: bool = True) -> None:
        """Stop the server (``fast``: SIGINT, aborting sessions; else SIGKILL, as a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT if fast else signal.SIGKILL)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if not fast:
            # A killed postmaster leaves its children running for a moment, holding the port.
            time.sleep(0.5)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP): connections stay open and nothing
        answers, as a hung database or a network black hole."""
        assert self.process is not None
        # The server first, stopped before its children are listed: a backend it forks meanwhile
        # (a pool's new connection) would otherwise go on answering.
        pids = [self.process.pid]
        _stop(self.process.pid)
        for child in children(self.process.pid):
            pids.append(child)
            _stop(child)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def terminate_backends(self, database: str, application_name: str | None = None) -> int:
        """Kill the server processes serving ``database``'s clients (their connections drop)."""
        where = f"datname = '{database}' AND pid <> pg_backend_pid()"
        if application_name is not None:
            where += f" AND application_name = '{application_name}'"
        result = self.psql(
            "postgres",
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}",
        )
        return result.returncode

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database for one test; its URL. Dropped afterwards."""
        name = "t_" + uuid.uuid4().hex[:16]
        self.psql("postgres", f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            if self.process is not None and self.process.poll() is None:
                self.psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=False)
