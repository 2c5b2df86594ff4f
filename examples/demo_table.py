"""Reproduce the demo's accuracy table without the CLI (same as `dots-merge demo`).

python examples/demo_table.py [--quick]
"""

import sys

from dots_merge.demo.pipeline import run_demo

if __name__ == "__main__":
    report = run_demo(quick="--quick" in sys.argv, quiet=True)
    for name, accuracy in report["accuracy"].items():
        print(f"{name:16s} {100 * accuracy:5.1f} %")
