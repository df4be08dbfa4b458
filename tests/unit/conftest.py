"""Unit-test isolation: secrets registered with redact while a test reads a scenario (config.scenario
registers its credentials when the file is read) must not mask values in another test."""

import pytest

from servematrix import redact


@pytest.fixture(autouse=True)
def _forget_registered_secrets():
    yield
    redact.forget()
