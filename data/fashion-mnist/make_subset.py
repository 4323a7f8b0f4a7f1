#!/usr/bin/env python3
"""Make the Fashion-MNIST subset shipped in this folder.

Takes the FIRST 10,000 training and the FIRST 2,000 test images/labels of the full
Fashion-MNIST set and writes them as valid gzipped IDX files with the standard names.
gzip is written with mtime=0 and no file name, so the output bytes are reproducible.

Usage (from the repository root):
    python3 data/fashion-mnist/make_subset.py [SOURCE_DIR] [OUT_DIR]

SOURCE_DIR defaults to /usr/share/datasets/fashion-mnist (Debian package
dataset-fashion-mnist); OUT_DIR defaults to the folder holding this script.
"""

import gzip
import os
import struct
import sys

N_TRAIN = 10_000
N_TEST = 2_000


def read_idx(path):
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    return magic, dims, body


def find(src, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(src, name)
        if os.path.exists(p):
            return p
    sys.exit(f"{src}: neither {stem}.gz nor {stem} found")


def write_subset(src_path, out_path, n):
    magic, dims, body = read_idx(src_path)
    if dims[0] < n:
        sys.exit(f"{src_path}: has only {dims[0]} items, need {n}")
    item = 1
    for d in dims[1:]:
        item *= d
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), n, *dims[1:])
    payload = header + body[: n * item]
    with open(out_path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload)
    print(f"{out_path}: {n} items of shape {tuple(dims[1:])}")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    for stem, n in (
        ("train-images-idx3-ubyte", N_TRAIN),
        ("train-labels-idx1-ubyte", N_TRAIN),
        ("t10k-images-idx3-ubyte", N_TEST),
        ("t10k-labels-idx1-ubyte", N_TEST),
    ):
        write_subset(find(src, stem), os.path.join(out, stem + ".gz"), n)


if __name__ == "__main__":
    main()
