"""The fleet the tests run against, started by scripts/python-client-test.sh.

Each test makes accounts of its own (``holdfast account grant --create``, with
a random name), so tests share the fleet but no state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from holdfast_client import Client

VARIABLES = (
    "HOLDFAST_TEST_AMQP_URL",
    "HOLDFAST_TEST_HTTP_URL",
    "HOLDFAST_TEST_KEY",
    "HOLDFAST_TEST_NAMESPACE",
    "HOLDFAST_BIN",
    "HOLDFAST_DATABASE_URL",
)


@dataclasses.dataclass(frozen=True)
class Fleet:
    amqp_url: str
    http_url: str
    key: str
    namespace: str
    bin: str

    def cli(self, *args: str) -> str:
        """Run the holdfast CLI (on the fleet's database) and return what it printed."""
        done = subprocess.run(
            [self.bin, *args], capture_output=True, text=True, check=False, timeout=60
        )
        if done.returncode != 0:
            raise AssertionError(f"holdfast {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def account(self, account_id: str) -> dict[str, Any]:
        """The account as `holdfast account show --json` prints it."""
        shown = json.loads(self.cli("account", "show", account_id, "--json"))
        assert isinstance(shown, dict)
        account = shown.get("account", shown)
        assert isinstance(account, dict)
        return account


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    missing = [v for v in VARIABLES if not os.environ.get(v)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: run these tests with scripts/python-client-test.sh "
            "(make python-client), which starts a fleet for them"
        )
    env = os.environ
    return Fleet(
        amqp_url=env["HOLDFAST_TEST_AMQP_URL"],
        http_url=env["HOLDFAST_TEST_HTTP_URL"],
        key=env["HOLDFAST_TEST_KEY"],
        namespace=env["HOLDFAST_TEST_NAMESPACE"],
        bin=env["HOLDFAST_BIN"],
    )


@pytest.fixture
def new_account(fleet: Fleet) -> Callable[[int], str]:
    """Make an account with this many credits; returns its id."""

    def make(credits: int) -> str:
        account_id = f"py-{uuid.uuid4().hex[:12]}"
        fleet.cli("account", "grant", account_id, str(credits), "--create", "--note", "python client test")
        return account_id

    return make


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(
        fleet.amqp_url,
        fleet.http_url,
        key=fleet.key,
        namespace=fleet.namespace,
        timeout=20.0,
        poll_interval=0.5,
    ) as c:
        yield c
