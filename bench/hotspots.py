"""Summarise a py-spy raw profile (`--format raw --threads`, as `bench.delivery --profile`
writes it): time per thread, per library, per function (self and inclusive), and per
last insertcoin line on the stack (which line of ours led to the cost).

    uv run python -m bench.hotspots bench/results/profile/server-sqlite.txt [--top 25]
"""

import argparse
import re
from collections import Counter
from pathlib import Path

from bench.stats import table

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _parse(path: Path) -> list[tuple[str, list[tuple[str, str, str]], int]]:
    samples = []
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = ""
        if parts and parts[0].startswith("thread ("):
            thread = parts[0].split(":", 1)[1].strip() if ":" in parts[0] else parts[0]
            parts = parts[1:]
        frames = []
        for part in parts:
            match = _FRAME.match(part)
            if match:
                frames.append((match["func"], match["file"], match["line"] or ""))
            else:
                frames.append((part, "", ""))
        samples.append((thread, frames, int(count)))
    return samples


def _library(file: str) -> str:
    if file.startswith("<"):
        return "generated"
    if "/" not in file:
        return f"stdlib:{file.removesuffix('.py')}"
    head = file.split("/", 1)[0]
    return head


def summarise(path: Path, top: int) -> str:
    samples = _parse(path)
    total = sum(n for _, _, n in samples)
    threads: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for thread, frames, n in samples:
        threads[re.sub(r"\d+", "N", thread) or "?"] += n
        if not frames:
            continue
        func, file, _line = frames[-1]
        libraries[_library(file)] += n
        self_time[f"{func} ({file})"] += n
        for key in {f"{f} ({fi})" for f, fi, _ in frames}:
            inclusive[key] += n
        mine = [fr for fr in frames if fr[1].startswith("insertcoin/")]
        if mine:
            f, fi, ln = mine[-1]
            ours[f"{fi}:{ln} {f}"] += n
        else:
            ours["(no insertcoin frame) " + _library(frames[-1][1])] += n

    def share(counter: Counter[str], title: str) -> str:
        rows = [[k[:110], v, round(100 * v / total, 1)] for k, v in counter.most_common(top)]
        return f"\n{title}\n" + table(["", "samples", "%"], rows)

    return "\n".join(
        [
            f"{path}: {total} samples (non-idle)",
            share(threads, "by thread"),
            share(libraries, "by library of the running (leaf) frame"),
            share(ours, "by the deepest insertcoin line on the stack"),
            share(self_time, "self time by function"),
            share(inclusive, "inclusive time by function"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
