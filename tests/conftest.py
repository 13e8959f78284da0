"""Suite-wide pytest options, and the LM backends the suite runs on.

``--fail-on-skip`` (used by ``make test`` and CI) turns any skipped test into a
failed run: a skipped integration test would hide a missing broker or feature.
"""

from __future__ import annotations

import os

import pytest

# The product answers with the local model in every pool by default. The suite opts
# into DSPex's echo SIMULATION (deterministic and instant) unless a test names other
# backends; the integration tests' `settings` fixture keeps the local model on the gpu
# pool. tests/unit/test_settings.py checks the product default without this. (Only the
# default variant is set here: an environment `pool_variants` would be deep-merged into
# every test's own `lm={"pool_variants": ...}` and could not be emptied.)
os.environ.setdefault("DSPEX_LM__DEFAULT_VARIANT", "echo")


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
