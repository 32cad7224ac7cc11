import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import high_modules_after  # noqa: E402  (helpers lives beside this file)

# The tests run many tiny models: one intra-op thread avoids thread hand-off costs
# that dominate at this size on a 2-core machine.
torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    """A run of tests from tests/passes, targets, runtime and capture only fails if it loaded any
    module of spruce.api, spruce.compiler or spruce.cli: the tests of a floor use that floor and
    the ones below it (tests/test_test_layout.py checks their source for the same)."""
    items = getattr(session, "items", [])
    loaded = high_modules_after([item.path for item in items], list(sys.modules), Path(__file__).parent)
    if loaded:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"tests of the low floors loaded {', '.join(loaded)}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"ERROR: {message}", red=True)
        else:
            print(f"ERROR: {message}", file=sys.stderr)
