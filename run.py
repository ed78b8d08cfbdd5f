#!/usr/bin/env python3
"""Bootstrap and run: creates/updates .venv, then runs `incontext …` or the tests.

    python3 run.py edit examples/shapes.png "make the red circle blue" -o edited.png
    python3 run.py test            # the test suite (what CI runs)
    python3 run.py serve           # any other incontext command

Only the Python standard library is used here, so this works on a fresh machine.
torch is installed first as torch==2.13.0 so pip takes the machine's CPU wheel.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".incontext-installed"


def ensure_env() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        print("creating .venv …", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("installing dependencies into .venv (first run takes a few minutes) …", file=sys.stderr)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[test]"], check=True)
    # Black Forest Labs' client, for its compatibility test: it pins pillow==10.4.0, which
    # would downgrade ours, and it runs with our pillow; so it comes without its dependencies.
    subprocess.run(pip + ["--no-deps", "blackforest==0.1.3"], check=True)
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    ensure_env()
    if argv[:1] == ["test"]:
        cmd = [str(BIN / "python"), "-m", "pytest", *argv[1:]]
    else:
        cmd = [str(BIN / "incontext"), *argv]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
