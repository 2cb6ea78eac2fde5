"""A sensor command for the benchmark: print '<index> <celsius>' from a file; log when it reads heat."""
import os
import sys
import time

temps, events, hot = sys.argv[1], sys.argv[2], float(sys.argv[3])
text = open(temps).read()
for line in text.splitlines():
    if line.strip() and float(line.split()[1]) > hot:
        with open(events, "a") as f:
            f.write(f"hot {time.time():.6f} {os.getpid()}\n")
        break
sys.stdout.write(text)
