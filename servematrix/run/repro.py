"""What reproduces one matrix entry by hand, outside servematrix: the shell lines that start its
server and run its gsm8k check (`servematrix repro ID`), or the `docker compose` line that starts
the same server in a container (`servematrix repro ID --compose`, see docker-compose.yml).

Everything here is printed to be pasted: comments are one line each (a reason holding a newline
would start a command), commands are quoted word by word, and no secret appears in either."""

from __future__ import annotations

import shlex
from pathlib import Path


def repro_script(entry, scenario, model_path: str, port: int, python: str, limit: int | None) -> str:
    """The commands that start the entry's server on `port` and run gsm8k (`limit` questions)
    against it through lm-eval with `python`."""
    from servematrix.check import gsm8k
    from servematrix.redact import one_line, shell_command
    from servematrix.serve.server import build_spec

    spec = build_spec(entry, scenario, model_path, port, Path("server.log"), python)
    out = Path("repro-gsm8k")
    exp = entry.expectation
    waiver = f" — {exp.reason} {exp.bug}" if exp.expect == "xfail" else ""
    lm_eval = gsm8k.command(spec.base_url, scenario.model_name, scenario.gsm8k, limit, out, python)
    return "\n".join([
        "# " + one_line(f"servematrix repro {entry.id}   (from {entry.origin})"),
        "# " + one_line(f"expect: {exp.expect}{waiver}"),
        "# " + one_line(f"model: {model_path}"),
        "",
        f"# 1. start the server (healthy when `curl -s localhost:{port}/health` answers 200):",
        spec.shell(),
        "",
        "# 2. gsm8k through lm-eval (writes the task file, then runs it):",
        shell_command(["servematrix", "gsm8k-task", str(out), "--num-fewshot", str(scenario.gsm8k.num_fewshot)]),
        shell_command(lm_eval, gsm8k.OFFLINE_ENV),
    ])


def compose_variables(entry, scenario, model_path: str, port: int) -> dict[str, str]:
    """The docker-compose.yml variables that reproduce one entry (see the file's header)."""
    from servematrix.paths import cache_dir

    cache = cache_dir()
    model = model_path
    if Path(model_path).is_relative_to(cache):  # forged/converted checkpoints live in the cache
        model = "/cache/" + str(Path(model_path).relative_to(cache))
    from servematrix.redact import redact_argv, redact_text

    # printed for pasting: credentials given in the args are masked here, where they are still
    # words of an argv (compose_command masks the rest of each value)
    variables = {
        "MODEL": redact_text(model), "TP": str(entry.tp), "PP": str(entry.pp), "PORT": str(port),
        "QUANT_ARGS": shlex.join(redact_argv(scenario.quants[entry.quant].args)),
        "SERVER_ARGS": shlex.join(redact_argv(scenario.server.args)),
        "FIXES": ",".join(entry.fixes), "CACHE": str(cache),
    }
    if entry.device == "gpu":
        variables["GPUS"] = str(entry.tp * entry.pp)
    elif entry.tp * entry.pp > 1:
        from servematrix.serve.server import cpu_bind

        variables["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(entry.tp * entry.pp)
    return variables


def compose_command(entry, scenario, model_path: str, port: int) -> str:
    """A comment line, then the `docker compose ... up` line that starts the entry's server."""
    from servematrix.redact import one_line, shell_command

    service = "vllm-gpu" if entry.device == "gpu" else "vllm-cpu"
    variables = compose_variables(entry, scenario, model_path, port)
    # names checked, values quoted and redacted: the line is safe to paste
    command = shell_command(["docker", "compose", "--profile", service.split("-")[1], "up", service], variables)
    comment = f"{entry.id}: the server in a container (build once with the same variables and `build`"
    if service == "vllm-cpu":  # vLLM's CPU image needs a registry; the script builds its equivalent locally
        comment += "; no image registry: export CPU_IMAGE=$(sh docker/build-cpu-base.sh) first"
    # one comment line, then the command (callers and users take the second line)
    return "# " + one_line(comment + ")") + "\n" + command
