import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import high_modules_after  # noqa: E402  (helpers lives beside this file)
from slow import SLOW  # noqa: E402

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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(session, config, items):
    """Mark ``slow`` every test that tests/slow.py lists (by node id, or a prefix of one: a file, or
    a test with all its parameters); tests/test_test_layout.py checks that every entry exists."""
    for item in items:
        node = item.nodeid.removeprefix("tests/")
        if any(node == entry or node.startswith((entry + "::", entry + "[")) for entry in SLOW):
            item.add_marker(pytest.mark.slow)
