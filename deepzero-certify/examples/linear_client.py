#!/usr/bin/env python3
"""deepzero `process:` classifier f(x) = sign(w.x + b); scores [-(w.x+b), w.x+b]. Pure Python.
Usage: python3 linear_client.py B W_1 ... W_d   (d = C*H*W weights, one per pixel)"""
import struct, sys
b, w = float(sys.argv[1]), [float(v) for v in sys.argv[2:]]
stdin, stdout = sys.stdin.buffer, sys.stdout
while True:
    header = stdin.readline()          # "N C H W\n"; empty when deepzero closes stdin
    if not header:
        break
    n, c, h, wd = map(int, header.split())
    d = c * h * wd
    if d != len(w):
        sys.exit(f"linear_client: {len(w)} weights but images of {d} pixels")
    x = struct.unpack(f"<{n * d}f", stdin.read(4 * n * d))
    s = [b + sum(map(float.__mul__, w, x[i * d:(i + 1) * d])) for i in range(n)]
    stdout.write("".join(f"{-v!r} {v!r}\n" for v in s))
    stdout.flush()
