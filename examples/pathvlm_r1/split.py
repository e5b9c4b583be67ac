"""Freeze the paper's PathMMU split (3,000 SFT / 1,000 RL / 1,385 test) in a manifest file.

    python examples/pathvlm_r1/split.py --pathmmu-root data/PathMMU --output splits/pathmmu_paper_seed0.json

Every stage and the evaluation read their rows from this file, so they never overlap, and the
file can be shared so another lab tests on the same 1,385 items.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

from data import load_pathmmu, paper_split, save_split_manifest  # noqa: E402
from data.pathmmu import PAPER_SUBSETS, SPLITS  # noqa: E402
from data.splits import PAPER_SIZES, PART_NAMES  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pathmmu-root", default="data/PathMMU")
    parser.add_argument("--output", default="splits/pathmmu_paper_seed0.json")
    parser.add_argument("--subsets", nargs="+", default=list(PAPER_SUBSETS))
    parser.add_argument("--sizes", nargs=3, type=int, default=list(PAPER_SIZES), metavar=("SFT", "RL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-bad-item", choices=["error", "skip"], default="error")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        raise SystemExit(f"{args.output} exists: a frozen split is never overwritten (delete it to make a new one)")
    rows = load_pathmmu(args.pathmmu_root, args.subsets, SPLITS, on_bad_item=args.on_bad_item)
    print(f"PathMMU {', '.join(args.subsets)}: {len(rows)} items after removing duplicates"
          + (f", {len(rows.skipped)} bad items skipped" if rows.skipped else ""))
    parts = paper_split(rows, args.sizes, args.seed)
    save_split_manifest(args.output, dict(zip(PART_NAMES, parts)), seed=args.seed, sizes=args.sizes,
                        subsets=args.subsets, splits=list(SPLITS), total_rows=len(rows))
    print(f"wrote {args.output}: " + ", ".join(f"{name} {len(part)}" for name, part in zip(PART_NAMES, parts)))


if __name__ == "__main__":
    main()
