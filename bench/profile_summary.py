"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) by function.

    python bench/profile_summary.py PROFILE.txt [TOP]

Prints the functions with the largest self share (the frame on top of the stack)
and the largest inclusive share (anywhere on the stack), in percent of samples.
"""

from __future__ import annotations

import sys
from collections import Counter


def summarise(path: str, top: int = 25) -> None:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path) as profile:
        for line in profile:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")"
                      if " (" in frame else frame for frame in stack.split(";")]
            total += count
            self_counts[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    print(f"{total} samples")
    for title, counter in (("self", self_counts), ("inclusive", inclusive)):
        print(f"\n-- top {top} by {title} share")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / total:6.1f}%  {frame}")


if __name__ == "__main__":
    summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
