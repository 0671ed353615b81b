"""The examples in README.md and clients/python/README.md run as printed,
pointed at the test fleet (its URLs, key, namespace and a fresh account)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
from collections.abc import Awaitable, Callable

import pytest
from conftest import Fleet

HERE = pathlib.Path(__file__).parent


def example(path: pathlib.Path, fleet: Fleet, account: str) -> dict[str, object]:
    """The first Python block that uses the client, pointed at the fleet, run up
    to (not including) its `asyncio.run(...)` line; returns its globals."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    code = next(b for b in blocks if "holdfast_client" in b)
    for printed, real in [
        ("amqp://guest:guest@127.0.0.1:5672/%2f", fleet.amqp_url),
        ("http://127.0.0.1:8080", fleet.http_url),
        ('"acme"', repr(account)),
        ('key="hf_live_…"', f"key={fleet.key!r}"),
        ('namespace="holdfast"', f"namespace={fleet.namespace!r}"),
        (", key=key)", f", key=key, namespace={fleet.namespace!r})"),
    ]:
        code = code.replace(printed, real)
    assert fleet.namespace in code, "the example names the Client's arguments as expected"
    code = "\n".join(line for line in code.splitlines() if not line.startswith("asyncio.run("))
    scope: dict[str, object] = {}
    exec(compile(code, str(path), "exec"), scope)
    return scope


@pytest.mark.parametrize(
    ("readme", "entry", "with_key"),
    [(HERE / "../../../README.md", "generate_all", True), (HERE / "../README.md", "main", False)],
)
async def test_the_readme_example_runs(
    fleet: Fleet, new_account: Callable[[int], str], readme: pathlib.Path, entry: str, with_key: bool
) -> None:
    scope = example(readme, fleet, new_account(100))
    run = scope[entry]
    assert callable(run)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        started: Awaitable[None] = run(fleet.key) if with_key else run()
        await started
    out = printed.getvalue()
    assert "You have enough credits to generate 8 out of 10 items." in out
    assert "succeeded=8" in out and "skipped=2" in out, out
