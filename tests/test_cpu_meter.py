"""The benchmark's CPU meter: CPU per group, and context switches.

Measured on real child processes whose behaviour is known: one that spins
(CPU, few switches) and one that blocks again and again (switches, little
CPU).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from shardpool.benchmark.cpu import SWITCHES, CpuMeter

BLOCKS = 300
# Waits for a line on STDIN, then spins for 0.3 s of CPU or sleeps BLOCKS times,
# then says so.
CHILD = """
import sys, time
sys.stdin.readline()
if sys.argv[1] == "spin":
    end = time.process_time() + 0.3  # 0.3 s of CPU, however long that takes
    while time.process_time() < end:
        pass
else:
    for _ in range(int(sys.argv[2])):
        time.sleep(0.0005)
print("done", flush=True)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def child(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(BLOCKS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def metered(mode: str) -> tuple[dict[str, float], float]:
    """The meter's result over the child's work, and the window's length (s)."""
    proc = child(mode)
    try:
        meter = CpuMeter({"php": [proc.pid]})
        start = time.perf_counter()
        meter.start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"  # bounded: the child ends by itself
        result = meter.stop()  # the child is alive until it is killed below
        return result, time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait(10)


def test_a_process_that_blocks_again_and_again_is_counted_switching() -> None:
    result, seconds = metered("sleep")
    switches = result[SWITCHES] * seconds  # a rate: back to a count (an upper bound)
    # Each sleep blocks once, and reading STDIN and writing its line add a few.
    assert BLOCKS <= switches <= 3 * BLOCKS, result
    assert result["php"] < 50, result  # sleeping costs little CPU


def test_a_spinning_process_is_counted_busy_and_seldom_switching() -> None:
    result, seconds = metered("spin")
    assert 0.3 <= result["php"] / 100 * seconds < 0.5, result  # its CPU seconds
    assert result[SWITCHES] * seconds < BLOCKS, result  # switched out only when preempted
