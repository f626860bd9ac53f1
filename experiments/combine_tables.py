"""Combine CSV tables written by several runs of one experiment script into one table (CSV + markdown).

Rows are concatenated in the given order; a later row with the same key columns replaces an earlier one.

    python experiments/combine_tables.py a.csv b.csv --key method R --out experiments/results/iso_flops_resnet20_cpu \\
        --title "..."
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from dynprune.io import to_markdown, write_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--key", nargs="+", default=["method", "R"], help="columns identifying a row")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.csv and OUT.md")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for path in args.tables:
        with path.open() as f:
            for row in csv.DictReader(f):
                missing = [k for k in args.key if k not in row]
                if missing:
                    raise ValueError(f"{path} has no column(s) {missing}; its columns: {list(row)}")
                rows[tuple(row[k] for k in args.key)] = row
    write_table(list(rows.values()), args.out, args.title)
    print(to_markdown(list(rows.values())))


if __name__ == "__main__":
    main()
