#!/usr/bin/env python3
"""Measure `flawscope tui` responsiveness in a real terminal (tmux).

Usage:
    tui/scripts/measure_tui.py MODEL IMAGE_DIR [IMAGE_DIR...]

The image folders are symlinked into one temporary folder (names prefixed
with their last two folder names, so equal file names do not collide) and a
fresh results database is used, so every image is scored. The TUI runs in a
160x48 tmux session with FLAWSCOPE_TUI_TRACE set; while it scores, the script
presses j / k every 0.25 s. Reported:

- from the trace (the program's own clock, started at `main`): time to the
  first frame, to the first scored row drawn, to the end of scoring, and the
  key-to-redraw latency (key read by the input thread -> frame written);
- from outside (this script's clock): time from launching the session to a
  scored row being visible in `tmux capture-pane`, and for a sample of key
  presses the time from `tmux send-keys` until the selection visibly moved
  (includes tmux and the polling interval of about 5-10 ms).
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("FLAWSCOPE_BIN", "target/release/flawscope")
SOCKET = f"flawscope-measure-{os.getpid()}"
ROW = re.compile(r"▶ \d\.\d{3}")


def tmux(*args, capture=False):
    cmd = ["tmux", "-L", SOCKET, "-f", "/dev/null", *args]
    if capture:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    subprocess.run(cmd, check=True)
    return ""


def screen():
    return tmux("capture-pane", "-p", "-t", "m", capture=True)


def selected_line(text):
    for line in text.splitlines():
        if "▶" in line:
            return line.split("││")[0]
    return None


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    model, dirs = os.path.abspath(sys.argv[1]), sys.argv[2:]
    work = tempfile.mkdtemp(prefix="flawscope-measure-")
    images = os.path.join(work, "images")
    os.mkdir(images)
    count = 0
    for d in dirs:
        d = os.path.abspath(d)
        prefix = "_".join(d.rstrip("/").split("/")[-2:])
        for name in sorted(os.listdir(d)):
            os.symlink(os.path.join(d, name), os.path.join(images, f"{prefix}_{name}"))
            count += 1
    trace = os.path.join(work, "trace.txt")
    db = os.path.join(work, "results.sqlite")
    print(f"{count} images; work folder {work}")
    print("load before:", open("/proc/loadavg").read().strip(), f"({os.cpu_count()} CPUs)")

    command = (
        f"FLAWSCOPE_TUI_TRACE={trace} {os.path.abspath(BIN)} tui {images} "
        f"--model {model} --db {db}; echo EXITED:$?; sleep 600"
    )
    launched = time.monotonic()
    tmux("new-session", "-d", "-x", "160", "-y", "48", "-s", "m", command)
    try:
        while not ROW.search(screen()):
            if time.monotonic() - launched > 120:
                sys.exit("no row after 120 s:\n" + screen())
            time.sleep(0.005)
        first_row_external = time.monotonic() - launched

        # Key presses while scoring: a timed sample first, then steady presses.
        external = []
        keys = ["j", "j", "k", "j", "k", "k"]
        i = 0
        while "done:" not in screen():
            before = selected_line(screen())
            sent = time.monotonic()
            tmux("send-keys", "-t", "m", keys[i % len(keys)])
            i += 1
            if len(external) < 40:
                while time.monotonic() - sent < 2:
                    after = selected_line(screen())
                    if after != before:
                        external.append((time.monotonic() - sent) * 1e3)
                        break
            time.sleep(0.25)
        loadavg_during = open("/proc/loadavg").read().strip()
        tmux("send-keys", "-t", "m", "q")
        while "EXITED:" not in screen():
            time.sleep(0.05)
    finally:
        tmux("kill-server")

    lines = open(trace).read().splitlines()
    events = {}
    latencies = []
    done_ms = None
    for line in lines:
        parts = line.split()
        ms, what = float(parts[0]), parts[1]
        events.setdefault(what, ms)
        if what == "scoring_done":
            done_ms = ms
        if what == "key" and (done_ms is None):
            latencies.append(float(parts[parts.index("latency_ms") + 1]))
    print("load at the end of scoring:", loadavg_during)
    print(f"trace: first frame {events.get('first_frame', float('nan')):.0f} ms, "
          f"first scored row drawn {events.get('first_scored_row_visible', float('nan')):.0f} ms, "
          f"scoring done {events.get('scoring_done', float('nan')) / 1e3:.1f} s")
    print(f"trace: key-to-redraw while scoring, {len(latencies)} keys: "
          f"median {statistics.median(latencies):.1f} ms, p95 {pct(latencies, 0.95):.1f} ms, "
          f"max {max(latencies):.1f} ms")
    print(f"outside: launch to first scored row visible {first_row_external * 1e3:.0f} ms")
    if external:
        print(f"outside: send-keys to visible move, {len(external)} keys: "
              f"median {statistics.median(external):.0f} ms, p95 {pct(external, 0.95):.0f} ms, "
              f"max {max(external):.0f} ms")
    if os.environ.get("KEEP"):
        print("trace kept in", trace)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
