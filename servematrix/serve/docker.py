"""The docker backend: the same server, started as a container through the Docker Engine API
(`docker` SDK), with the lifecycle of serve.server.Server: healthy or a load failure, then torn down on
every path (crash, Ctrl-C, timeout): the container is stopped and removed.

The image must hold vLLM and servematrix (for the fix modules' plugin entry point), as
docker/Dockerfile.vllm builds: by default the CPU image of docker-compose.yml (`docker compose
--profile cpu build`, or docker/build-cpu-base.sh where no registry is reachable, which tags it
the same). Nothing from the host enters the container but two mounts: the model directory,
read-only at the same path, and the scenario's report directory, read-write (the fix modules
write their reports there). GPUs are requested by id for the entry's CUDA_VISIBLE_DEVICES;
DOCKER_HOST picks the engine (Podman's Docker-compatible service works too).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from servematrix import redact
from servematrix.serve.server import LaunchSpec, Server

STATUS_INTERVAL = 0.25  # s between container state queries (each is an API call)
# docker-compose.yml's vllm-cpu image (CPU_IMAGE unset); build-cpu-base.sh tags its build so too
DEFAULT_IMAGE = "servematrix/vllm-openai-cpu:v0.32.0"


class DockerConfig(BaseModel):
    image: str = DEFAULT_IMAGE
    python: str = "python3"  # the image's interpreter, replacing the runner's in the server argv
    network: str = "host"  # host | bridge (bridge publishes the port on 127.0.0.1)
    shm_size: str = "4g"  # vLLM's workers exchange tensors through /dev/shm
    mounts: list[str] = Field(default_factory=list)  # extra HOST:CONTAINER[:ro] volumes
    base_url: str | None = None  # the engine's API (default: DOCKER_HOST, else the local socket)


def _model_dir(argv: list[str]) -> str | None:
    if "--model" in argv:
        path = argv[argv.index("--model") + 1]
        return path if os.path.isabs(path) and os.path.exists(path) else None
    return None


class DockerServer(Server):
    """One vLLM server as one container."""

    def __init__(self, spec: LaunchSpec, config: DockerConfig | None = None):
        super().__init__(spec)
        self.config = config or DockerConfig()
        self.container = None
        self._code: int | None = None
        self._checked = 0.0
        self._log_thread: threading.Thread | None = None

    def _client(self):
        import docker

        return docker.DockerClient(base_url=self.config.base_url) if self.config.base_url else docker.from_env()

    def run_kwargs(self) -> dict:
        """Everything the Engine API gets, from the launch spec (pure: tested on its own)."""
        from docker.types import DeviceRequest

        argv = [self.config.python, *self.spec.argv[1:]]
        env = dict(self.spec.env)
        redact.check_env_keys(env)  # the same names LocalServer could set and shell() can print
        gpus = env.pop("CUDA_VISIBLE_DEVICES", None)  # the container sees its GPUs as 0..n-1
        volumes = {str(self.spec.log_path.parent): {"bind": str(self.spec.log_path.parent), "mode": "rw"}}
        model = _model_dir(argv)
        if model:
            volumes[model] = {"bind": model, "mode": "ro"}
        for m in self.config.mounts:
            host, _, rest = m.partition(":")
            bind, _, mode = rest.partition(":")
            volumes[host] = {"bind": bind or host, "mode": mode or "rw"}
        kw = dict(image=self.config.image, command=argv, environment=env, volumes=volumes, detach=True,
                  shm_size=self.config.shm_size, cap_add=["SYS_NICE"], labels={"servematrix": "server"},
                  name=f"servematrix-{self.spec.port}-{os.getpid()}")
        if gpus:
            kw["device_requests"] = [DeviceRequest(device_ids=gpus.split(","), capabilities=[["gpu"]])]
        if self.config.network == "host":
            kw["network_mode"] = "host"
        else:
            i = argv.index("--host")
            argv[i + 1] = "0.0.0.0"  # reachable through the published port
            kw["ports"] = {f"{self.spec.port}/tcp": (self.spec.host, self.spec.port)}
        return kw

    def _spawn(self) -> None:
        client = self._client()
        with open(self.spec.log_path, "ab") as log:
            log.write(f"# servematrix (docker {self.config.image}): {self.spec.shell()}\n".encode())
        self.container = client.containers.run(**self.run_kwargs())
        self._log_thread = threading.Thread(target=self._stream_log, daemon=True)
        self._log_thread.start()

    def _stream_log(self) -> None:
        """The container's output, as it comes, into server.log (the failure classifier reads it),
        redacted line by line (vLLM logs its api_key among its non-default args)."""
        lines = redact.LineRedactor()
        try:
            with open(self.spec.log_path, "ab", buffering=0) as log:
                try:
                    for chunk in self.container.logs(stream=True, follow=True):
                        log.write(lines.feed(chunk))
                finally:
                    log.write(lines.flush())
        except Exception:  # noqa: BLE001 - the container went away; the log ends there
            pass

    def returncode(self) -> int | None:
        if self.container is None or self._code is not None:
            return self._code
        now = time.monotonic()
        if now - self._checked < STATUS_INTERVAL:
            return None
        self._checked = now
        try:
            self.container.reload()
        except Exception:  # noqa: BLE001 - removed behind our back: treat as killed
            self._code = 137
            return self._code
        state = self.container.attrs["State"]
        if state.get("Status") in {"exited", "dead"}:
            self._code = state.get("ExitCode", 1)
            if state.get("OOMKilled"):
                self._code = 137
            self._finish_log()
        return self._code

    def _finish_log(self) -> None:
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)

    def _terminate(self, grace: float) -> None:
        if self.container is None:
            return
        try:
            self.container.stop(timeout=int(grace))
        except Exception:  # noqa: BLE001
            pass
        self._finish_log()
        try:
            self.container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def host_root_mounts(repo: Path) -> list[str]:
    """Developer mode only ("host-root"): mounts that let an image holding only a root skeleton run
    this host's own Python, venv and checkout, to try the backend against an engine without building
    the image (tests/integration/test_docker_backend.py's skeleton test). The real path is an image
    with vLLM and servematrix inside (DEFAULT_IMAGE)."""
    import sys

    paths = {"/usr", os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), str(repo.resolve())}
    if os.path.exists("/etc/ld.so.cache"):
        paths.add("/etc/ld.so.cache")
    roots = sorted(paths)
    kept = [p for p in roots if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in roots)]
    return [f"{p}:{p}:ro" for p in kept]
