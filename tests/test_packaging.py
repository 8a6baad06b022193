"""
SLOW (10-30 s, needs the package index): the project installs for real.

A contributor's usual set-up is C{pip install -e .} in a fresh virtualenv;
C{twistd} must then find the imserver plugin in the checkout
(C{twisted/plugins/imserver_plugin.py}). Each test copies the checkout to a
temporary directory, creates a virtualenv there with no access to the
venv running the tests (whose own install of imserver would hide the bug)
and installs the copy with today's pip (the one running the tests, through
C{pip --python}) and, in pip's isolated build, the newest setuptools.

Set C{IMSERVER_TEST_PACKAGING=skip} to skip them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

ROOT = Path(__file__).resolve().parent.parent
#: Not part of a checkout a contributor would install.
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "_trial_temp*",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "results",
    "imserver.db*",
    "dropin.cache",
    # clients/js and clients/web: npm's installs (tens of MB, not Python).
    "node_modules",
)


class SlowPackagingTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if os.environ.get("IMSERVER_TEST_PACKAGING") == "skip":
            raise SkipTest("IMSERVER_TEST_PACKAGING=skip")
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        self.checkout = self.base / "checkout"
        shutil.copytree(ROOT, self.checkout, ignore=IGNORED)
        self.venv = self.base / "venv"
        venv.EnvBuilder(with_pip=False, system_site_packages=False).create(self.venv)
        # Run from a neutral directory, without the test run's PYTHONPATH, so
        # nothing but the install can put the checkout on the path.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run_in_venv(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.base,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def pip_install(self, *args: str) -> None:
        done = self.run_in_venv(
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(self.venv / "bin" / "python"),
            "install",
            "-q",
            *args,
        )
        self.assertEqual(done.returncode, 0, f"pip install failed:\n{done.stdout}\n{done.stderr}")

    def assertTwistdRunsImserver(self) -> None:
        twistd = str(self.venv / "bin" / "twistd")
        listed = self.run_in_venv(twistd, "--help")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("imserver", listed.stdout, "twistd --help does not list the imserver plugin")
        usage = self.run_in_venv(twistd, "-n", "imserver", "--help")
        self.assertEqual(usage.returncode, 0, usage.stderr)
        self.assertIn("imserver [--config PATH]", usage.stdout)
        self.assertIn("--config", usage.stdout)

    def where(self, module: str) -> Path:
        done = self.run_in_venv(
            str(self.venv / "bin" / "python"), "-c", f"import {module} as m; print(m.__file__)"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return Path(done.stdout.strip())

    def test_editable_install_gives_twistd_the_plugin(self) -> None:
        """Defect 10: with C{pip install -e .} the plugin was not found (the
        editable finder does not put twisted/plugins on twisted.plugins.__path__)."""
        self.pip_install("-e", str(self.checkout))
        self.assertTwistdRunsImserver()
        # The code runs from the checkout, not from a copy.
        self.assertTrue(self.where("imserver").is_relative_to(self.checkout))
        self.assertTrue(self.where("twisted.plugins.imserver_plugin").is_relative_to(self.checkout))
        self.assertFalse(self.where("twisted").is_relative_to(self.checkout))

    def test_regular_install_still_gives_twistd_the_plugin(self) -> None:
        """What CI does (C{pip install '.[test]'}, without the extras here)."""
        self.pip_install(str(self.checkout))
        self.assertTwistdRunsImserver()
        site = self.where("imserver").parent.parent
        self.assertFalse(site.is_relative_to(self.checkout))
        self.assertTrue((site / "twisted" / "plugins" / "imserver_plugin.py").exists())
        # Only the project's own packages are installed, not its tests.
        self.assertFalse((site / "tests").exists())
        self.assertFalse((site / "bench").exists())
