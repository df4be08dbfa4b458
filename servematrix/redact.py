"""Keep secrets (HF_TOKEN and the like) out of reports, logs we write and printed commands."""

from __future__ import annotations

import os
import re

_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|AUTH)", re.I)
MASK = "***"


def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret(k) else v) for k, v in env.items()}


def redact_text(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace the value of every secret-named variable of `environ` wherever it appears."""
    environ = os.environ if environ is None else environ
    for name, value in environ.items():
        if value and len(value) >= 6 and is_secret(name):
            text = text.replace(value, MASK)
    return text
