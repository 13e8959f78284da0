"""Suite-wide pytest options, and the LM backends the suite runs on.

``--fail-on-skip`` (used by ``make test`` and CI) turns any skipped test into a
failed run: a skipped integration test would hide a missing broker or feature.
"""

from __future__ import annotations

import os

import pytest

# The product answers with the local model in every pool by default. The suite opts
# into DSPex's echo SIMULATION for the general and optimizer pools (deterministic and
# instant) and keeps the local model on the gpu pool, unless a test names other
# backends; tests/unit/test_settings.py checks the product default without this.
os.environ.setdefault("DSPEX_LM__DEFAULT_VARIANT", "echo")
os.environ.setdefault("DSPEX_LM__POOL_VARIANTS", '{"gpu": "local"}')


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        help="fail the run when any test is skipped (CI must never hide a missing broker)",
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--fail-on-skip"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        if reporter:
            reporter.write_line(f"--fail-on-skip: {len(skipped)} test(s) skipped", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
