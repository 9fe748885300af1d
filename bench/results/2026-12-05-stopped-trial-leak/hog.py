"""Keeps one CPU busy for SECONDS (the probe's stand-in for the other search's trial on a loaded 2-CPU machine)."""
import sys
import time

end = time.time() + float(sys.argv[1])
while time.time() < end:
    sum(i * i for i in range(10000))
