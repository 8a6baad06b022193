"""
The TypeScript SDK's own tests (clients/js: unit tests on fakes, and
end-to-end tests that start C{twistd -n imserver} themselves, over TCP and
WebSocket), run from the Python suite so that the README's one test command
covers them.

C{npm ci} runs first when C{clients/js/node_modules} is missing or older than
the lock file. Without node and npm the test is skipped, unless
C{IMSERVER_TEST_BACKENDS=required} (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import REPO, REQUIRED

JS = os.path.join(REPO, "clients", "js")


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "node and npm are needed for the JS SDK's tests"
        if REQUIRED:
            raise AssertionError(message + " (IMSERVER_TEST_BACKENDS=required)")
        raise SkipTest(message)
    return node, npm


def _stale(modules: str, lock: str) -> bool:
    """Whether C{npm ci} must run: no install yet, or one older than the lock file."""
    installed = os.path.join(modules, ".package-lock.json")
    return not os.path.exists(installed) or os.path.getmtime(installed) < os.path.getmtime(lock)


class JavaScriptSDKTests(TestCase):
    # npm test compiles, then runs the unit and end-to-end tests (a few
    # server starts): generous for a loaded 2-core machine.
    timeout = 1800

    def _npm(self, npm: str, *args: str, timeout: float) -> None:
        env = dict(os.environ)
        # The JS tests start twistd with this interpreter (see
        # clients/js/test/integration/server.ts) and this checkout.
        env["IMSERVER_PYTHON"] = sys.executable
        try:
            result = subprocess.run(
                [npm, *args],
                cwd=JS,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode("utf-8", "replace")
            self.fail(f"npm {' '.join(args)} took more than {timeout} s:\n{output[-20000:]}")
        output = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            self.fail(f"npm {' '.join(args)} failed ({result.returncode}):\n{output[-20000:]}")

    def test_npm_test(self) -> None:
        """C{npm test} in clients/js passes (after C{npm ci} if needed)."""
        _node, npm = _tools()
        if _stale(os.path.join(JS, "node_modules"), os.path.join(JS, "package-lock.json")):
            self._npm(npm, "ci", "--no-audit", "--no-fund", timeout=600)
        self._npm(npm, "test", timeout=1500)
