"""Long soak (issue 7.4): runs tests/integration/test_soak.py for SOAK_SECONDS (default 600) and commits its
figures to benchmarks/results/soak-<UTC date>.json.

    .venv/bin/python benchmarks/soak.py [--seconds 600]

Takes the whole machine for ~12 minutes (2 cores): run it alone, not next to the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="soak duration after warm-up")
    args = parser.parse_args()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    result = ROOT / "benchmarks" / "results" / f"soak-{stamp}.json"
    env = {**os.environ, "SOAK_SECONDS": f"{args.seconds:g}", "SOAK_RESULT": str(result)}
    cmd = [sys.executable, "-m", "pytest", "tests/integration/test_soak.py", "-q", "-s", "-p", "no:cacheprovider"]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"soak result: {result} (pytest exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
