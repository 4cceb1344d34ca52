#!/usr/bin/env python3
"""Copies the small ELPV sample that `flawscope demo` uses into demo/.

Usage: python3 scripts/make_demo_sample.py [../shared/data/elpv]

Deterministic: the first files by name of each split. Images are copied
byte for byte; their licence (CC BY-NC-SA 4.0) is in demo/LICENSE.md.
"""
import shutil
import sys
from pathlib import Path

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/elpv") / "mono"
TARGET = Path(__file__).resolve().parent.parent / "demo" / "solar_cell"
PICKS = [("train/good", 100), ("test/good", 8), ("test/defect", 8)]
ORIGIN = {"train/good": "train/good", "test/good": "test/good", "test/defect": "test/defect_p100"}

for split, count in PICKS:
    src = SOURCE / ORIGIN[split]
    files = sorted(src.glob("*.png"))[:count]
    if len(files) < count:
        sys.exit(f"{src} has only {len(files)} images")
    dst = TARGET / split
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)
    print(f"{split}: {count} images from {src}")
