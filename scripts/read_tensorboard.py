#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with TensorBoard's own reader and prints each scalar tag,
its number of points, its steps and its last value: an independent confirmation of what the tests
read back in Rust (crates/fila-train/tests/common/tfevents.rs).

Usage:  python3 scripts/read_tensorboard.py checkpoints/tiny-stage2/tensorboard [--json]
Needs:  pip install tensorboard   (the tests themselves need no Python package)
"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a run's tensorboard folder (the one holding events.out.tfevents.*)")
    ap.add_argument("--json", action="store_true", help="print {tag: [[step, value], ...]} as JSON")
    args = ap.parse_args()
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        sys.exit("read_tensorboard.py needs the `tensorboard` package: pip install tensorboard")
    if not os.path.isdir(args.dir):
        sys.exit(f"{args.dir}: not a folder")
    # size_guidance 0 keeps every point (the default samples scalars down to 10,000).
    acc = EventAccumulator(args.dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    if not tags:
        sys.exit(f"{args.dir}: no scalars in its event files")
    points = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}
    if args.json:
        print(json.dumps(points))
        return
    width = max(len(t) for t in tags)
    for t in tags:
        steps = [p[0] for p in points[t]]
        print(f"{t:<{width}}  {len(steps):>6} points  steps {steps[0]}..{steps[-1]}  last {points[t][-1][1]:.6g}")


if __name__ == "__main__":
    main()
