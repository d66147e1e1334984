"""Helpers shared by the tools that drive real `vllm serve` processes (knapspec-bench, knapspec-soak)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def _checkout() -> Path | None:
    """The source checkout this package runs from (an editable install), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "scripts" / "get_model.py").is_file() else None


CHECKOUT = _checkout()
ROOT = CHECKOUT or Path.cwd()  # where caches (.cache/) and results go, and where servers run


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def default_model() -> str:
    """SmolLM2-135M-Instruct as scripts/get_model.py fetches it (a source checkout only)."""
    if CHECKOUT is None:
        raise SystemExit(
            "--model is required outside a source checkout (its scripts/get_model.py fetches the "
            "default model, SmolLM2-135M-Instruct)"
        )
    out = subprocess.check_output([sys.executable, str(CHECKOUT / "scripts" / "get_model.py")], text=True)
    return out.strip().splitlines()[-1]


def vllm_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


@dataclass
class Server:
    """One `vllm serve` process tree on 127.0.0.1 (API server, EngineCore, workers), started with
    start_new_session=True (its own process group), so that stop() signals all of it."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ready_s: float | None = None
    exit_code: int | None = None
    shutdown_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        cmd = vllm_cmd() + ["serve"] + self.args + ["--host", HOST, "--port", str(self.port)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.exit_code = self.proc.returncode
            return
        t = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
            self.shutdown_s = round(time.monotonic() - t, 1)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.exit_code = self.proc.returncode

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def wait_healthy(self, client, timeout: float) -> None:
        await wait_healthy(client, [self], timeout)


async def wait_healthy(client, servers: list[Server], timeout: float) -> None:
    """Poll /health of every server until all answer 200; a server that exits or a timeout raises with the
    log tail."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if not s.alive():
                raise RuntimeError(f"{s.name} server exited with {s.proc.returncode} during startup:\n{s.tail()}")
            try:
                r = await client.get(s.url + "/health", timeout=5)
                if r.status_code == 200:
                    s.ready_s = round(time.monotonic() - s.t0, 1)
                    pending.remove(s)
            except Exception:  # noqa: BLE001 - not up yet
                pass
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                f"servers not healthy after {timeout:.0f} s: {[s.name for s in pending]}\n"
                + "\n".join(s.tail() for s in pending)
            )
        if pending:
            await asyncio.sleep(1.0)
