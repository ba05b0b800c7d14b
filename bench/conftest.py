"""Let `--benchmark-enable` run bench/test_micro.py although pyproject's addopts say --benchmark-skip."""

import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    session = getattr(config, "_benchmarksession", None)
    if session is not None and config.getoption("benchmark_enable", False):
        session.skip = False
