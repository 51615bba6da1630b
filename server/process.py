"""Run `sae-vllm serve` (or another OpenAI server command) as a child process on a free port,
and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SAE_VLLM_SERVE = (sys.executable, "-m", "sae_vllm.cli", "serve")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `sae-vllm serve ARGS...` child process (or `launcher ARGS...`, a command that takes
    --host and --port as vLLM's server does); its output goes to `log_path`."""

    def __init__(
        self,
        args: list[str],
        log_path: str | Path,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        launcher: Sequence[str] = SAE_VLLM_SERVE,
    ):
        self.launcher = tuple(launcher)
        self.name = "sae-vllm serve" if self.launcher == SAE_VLLM_SERVE else "the server"
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.host = host
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 600.0) -> ServerProcess:
        """Start the server and wait until /health answers 200; raises with the log's tail
        when the process exits or the timeout passes first."""
        command = [*self.launcher, *self.args]
        command += ["--host", self.host, "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"{self.name} did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the server (it shuts its engine down), then SIGKILL its process group."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # what is left of its session
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
