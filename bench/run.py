#!/usr/bin/env python3
"""blocksnap benchmark: snapshot and restore against the device-read floor.

Run as root through bench/run.sh. See BENCHMARKS.md for what is measured and
why. Every number it prints comes from this run.
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "blocksnap")
MIB = 1 << 20
BS = 4096


def sh(*args, **kw):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def flushbufs(dev):
    sh("blockdev", "--flushbufs", dev)


TIME = "/usr/bin/time"


def run_measured(argv, stdout=subprocess.DEVNULL):
    """Run argv; return (seconds, peak RSS bytes, stdout text).

    The peak RSS comes from GNU time, not from wait4() here: a child forked
    from this (large) Python process keeps the parent's high-water mark across
    exec, which would inflate every figure by the driver's own memory.
    """
    with tempfile.NamedTemporaryFile(mode="r") as rss_file:
        t0 = time.monotonic()
        p = subprocess.run(
            [TIME, "-f", "%M", "-o", rss_file.name, *argv],
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
        )
        dt = time.monotonic() - t0
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.decode(errors='replace')}")
        rss_kib = int(rss_file.read().strip().splitlines()[-1])
    out = p.stdout.decode(errors="replace") if stdout is None else ""
    return dt, rss_kib * 1024, out


def cat_floor(dev):
    # `cat DEVICE > /dev/null`, as the issue defines the floor.
    t0 = time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", dev], stdout=null, check=True)
    return time.monotonic() - t0, 0


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def fincore_bytes(dev):
    out = sh("fincore", "--bytes", "--noheadings", "--output", "RES", dev).strip()
    return int(out or 0)


def make_image(path, size, seed):
    """About 60% random bytes and 40% zeros, in 1 MiB runs."""
    rng = random.Random(seed)
    zero = bytes(MIB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(MIB, left)
            f.write(os.urandom(n) if rng.random() < 0.6 else zero[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def rewrite_blocks(dev, size, fraction, rng):
    """Rewrite `fraction` of the 4 KiB blocks at random offsets through the device."""
    nblocks = size // BS
    count = int(nblocks * fraction)
    if count == 0:
        return 0
    blocks = rng.sample(range(nblocks), count)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for b in blocks:
            os.pwrite(fd, os.urandom(BS), b * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


class Loop:
    def __init__(self, backing):
        self.dev = sh("losetup", "--find", "--show", backing).strip()

    def close(self):
        subprocess.run(["losetup", "-d", self.dev])


def take(dev, chain, *extra):
    dt, rss, out = run_measured([BIN, "chain", "take", dev, chain, "--json", *extra], stdout=None)
    info = json.loads(out[: out.rstrip().rfind("\n")]) if "\n" in out.rstrip() else {}
    return dt, rss, info


def median_spread(xs):
    if not xs:
        return float("nan"), float("nan")
    return statistics.median(xs), (max(xs) - min(xs))


def fmt_s(xs):
    m, s = median_spread(xs)
    return f"{m:.2f} s ± {s / 2:.2f}" if len(xs) > 1 else f"{m:.2f} s"


def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="4G", help="device size (default 4G)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one run (CI)")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--workdir", default=None, help="where images and chains go (default: a temp dir in /var/tmp)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (loop devices, drop_caches, mounts)")
    if a.quick:
        a.size, a.runs = "256M", 1
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(a.size[:-1]) * units[a.size[-1].upper()] if a.size[-1].upper() in units else int(a.size)
    work = tempfile.mkdtemp(prefix="blocksnap-bench-", dir=a.workdir or "/var/tmp")
    started = time.time()
    loops = []
    mounts = []
    rows = []  # (case, mode, ours, floor, ratio, rss, written, cache, note)
    notes = []
    rng = random.Random(7)
    try:
        backing = os.path.join(work, "device.img")
        print(f"making a {human(size)} image (60% random, 40% zeros, 1 MiB runs) in {work}", flush=True)
        make_image(backing, size, 1)
        loop = Loop(backing)
        loops.append(loop)
        dev = loop.dev
        map_bytes = (size // BS) * 8

        def prepare(mode):
            flushbufs(dev)
            if mode == "cold":
                drop_caches()
            else:
                # Warm: the backing file in the page cache.
                with open(backing, "rb") as f:
                    while f.read(16 * MIB):
                        pass

        # ---- full snapshot vs cp --sparse=always
        for mode in ["warm", "cold"]:
            ours, floor, rss, wr, cache = [], [], [], [], []
            for _ in range(a.runs):
                chain = os.path.join(work, "full.chain")
                for p in [chain, chain + ".fpmap"]:
                    if os.path.exists(p):
                        os.remove(p)
                prepare(mode)
                dt, r, info = take(dev, chain)
                ours.append(dt)
                rss.append(r)
                wr.append(allocated(chain))
                cache.append(fincore_bytes(dev))
                copy = os.path.join(work, "cp.img")
                prepare(mode)
                dt, _, _ = run_measured(["cp", "--sparse=always", dev, copy])
                floor.append(dt)
                os.remove(copy)
            rows.append(("full snapshot", mode, ours, floor, "cp --sparse=always", max(rss), statistics.median(wr), max(cache)))

        # ---- increments vs cat
        chain = os.path.join(work, "inc.chain")
        take(dev, chain)
        for pct in [0.0, 0.01, 0.10]:
            for mode in ["warm", "cold"]:
                ours, floor, rss, wr, cache, stored, changed = [], [], [], [], [], [], []
                for _ in range(a.runs):
                    rewrite_blocks(dev, size, pct, rng)
                    prepare(mode)
                    before = allocated(chain)
                    dt, r, info = take(dev, chain)
                    ours.append(dt)
                    rss.append(r)
                    wr.append(allocated(chain) - before)
                    cache.append(fincore_bytes(dev))
                    stored.append(info.get("stored_bytes", 0))
                    changed.append(info.get("changed_bytes", 0))
                    prepare(mode)
                    dt, _ = cat_floor(dev)
                    floor.append(dt)
                label = f"increment, {pct * 100:g}% changed"
                rows.append((label, mode, ours, floor, "cat", max(rss), statistics.median(wr), max(cache)))
                limit = [1.02 * c + 65536 for c in changed]
                ok = all(s <= l for s, l in zip(stored, limit)) and (pct > 0 or all(s < 65536 for s in stored))
                notes.append(
                    f"- {label} ({mode}): stored {human(statistics.median(stored))} for "
                    f"{human(statistics.median(changed))} changed "
                    f"(target: at most 1.02 x changed + 64 KiB{', and under 64 KiB' if pct == 0 else ''}): {'met' if ok else 'MISSED'}"
                )

        # ---- restore of the newest of 10 increments vs cp --sparse=always
        rchain = os.path.join(work, "restore.chain")
        take(dev, rchain)
        for _ in range(10):
            rewrite_blocks(dev, size, 0.01, rng)
            take(dev, rchain)
        newest = json.loads(sh(BIN, "chain", "list", rchain, "--json"))[-1]["id"]
        for mode in ["warm", "cold"]:
            ours, floor, rss, wr = [], [], [], []
            for _ in range(a.runs):
                target = os.path.join(work, "restored.img")
                prepare(mode)
                if mode == "warm":
                    with open(rchain, "rb") as f:
                        while f.read(16 * MIB):
                            pass
                dt, r, _ = run_measured([BIN, "chain", "restore", rchain, newest, target])
                ours.append(dt)
                rss.append(r)
                wr.append(allocated(target))
                os.remove(target)
                copy = os.path.join(work, "cp.img")
                prepare(mode)
                dt, _, _ = run_measured(["cp", "--sparse=always", dev, copy])
                floor.append(dt)
                os.remove(copy)
            rows.append(("restore, newest of 10 increments", mode, ours, floor, "cp --sparse=always", max(rss), statistics.median(wr), None))

        # ---- a mounted ext4: the freeze window
        fs_size = max(size // 4, 256 * MIB)
        fs_backing = os.path.join(work, "fs.img")
        with open(fs_backing, "wb") as f:
            f.truncate(fs_size)
        fsloop = Loop(fs_backing)
        loops.append(fsloop)
        sh("mkfs.ext4", "-q", "-F", fsloop.dev)
        mnt = os.path.join(work, "mnt")
        os.mkdir(mnt)
        sh("mount", fsloop.dev, mnt)
        mounts.append(mnt)
        files = []
        for i in range(int(fs_size * 0.5 // (16 * MIB))):
            p = os.path.join(mnt, f"f{i}")
            with open(p, "wb") as f:
                f.write(os.urandom(16 * MIB))
            files.append(p)
        os.sync()
        fchain = os.path.join(work, "fs.chain")
        freeze = {"full": [], "1%": []}
        total = {"full": [], "1%": []}
        for run in range(a.runs):
            for p in [fchain, fchain + ".fpmap"]:
                if os.path.exists(p):
                    os.remove(p)
            dt, _, info = take(fsloop.dev, fchain, "--intent-dir", os.path.join(work, "intents"))
            freeze["full"].append(info["freeze_ms"] / 1000)
            total["full"].append(dt)
            for p in rng.sample(files, max(1, len(files) // 20)):
                with open(p, "r+b") as f:
                    for _ in range(8):
                        f.seek(rng.randrange(16 * MIB // BS) * BS)
                        f.write(os.urandom(BS))
                    os.fsync(f.fileno())
            dt, _, info = take(fsloop.dev, fchain, "--intent-dir", os.path.join(work, "intents"))
            freeze["1%"].append(info["freeze_ms"] / 1000)
            total["1%"].append(dt)
        fs_rows = [
            (f"ext4 {human(fs_size)}, half full, mounted: full snapshot", freeze["full"], total["full"]),
            (f"ext4 {human(fs_size)}: increment after in-place writes", freeze["1%"], total["1%"]),
        ]
    finally:
        for m in mounts:
            subprocess.run(["umount", m])
        for l in loops:
            l.close()
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.time() - started
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cmd = "bench/run.sh " + " ".join(sys.argv[1:])
    lines = []
    lines.append("# blocksnap benchmarks\n")
    lines.append(
        f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with `{cmd.strip()}` "
        f"({elapsed / 60:.1f} minutes) on {platform.node()}: {os.cpu_count()} CPUs ({cpu}), {human(mem)} RAM, "
        f"Linux {platform.release()}. Device: a {human(size)} loop device over an image of about 60% random "
        f"bytes and 40% zeros in 1 MiB runs. Each measurement ran {a.runs} time(s); times are the median "
        f"± half the spread (max - min). *Warm*: the loop device's backing file in the page cache; *cold*: "
        f"`echo 3 > /proc/sys/vm/drop_caches` first. Both sides start after `blockdev --flushbufs` on the device, "
        f"the invalidation a correct snapshot does.\n"
    )
    lines.append("| case | cache | blocksnap | floor | floor command | ratio | peak RSS | written | device page cache after |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for case, mode, ours, floor, fcmd, rss, wr, cache in rows:
        ratio = statistics.median(ours) / statistics.median(floor)
        lines.append(
            f"| {case} | {mode} | {fmt_s(ours)} | {fmt_s(floor)} | `{fcmd}` | {ratio:.2f} | {human(rss)} | {human(wr)} | "
            f"{human(cache) if cache is not None else '-'} |"
        )
    lines.append(f"\nFingerprint map of this device: {human(map_bytes)} (8 bytes per 4 KiB block; a take reads and writes it through a mapping of its file, released behind the scan).\n")
    lines.append("Stored bytes per increment:\n")
    lines.extend(notes)
    lines.append("\nFreeze window of a mounted filesystem (from `chain list --json`'s `freeze_ms`):\n")
    lines.append("| case | freeze window | whole take |")
    lines.append("|---|---|---|")
    for case, fz, tot in fs_rows:
        lines.append(f"| {case} | {fmt_s(fz)} | {fmt_s(tot)} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out != "-":
        existing = ""
        marker = "<!-- analysis -->"
        if os.path.exists(a.out):
            existing = open(a.out).read()
        tail = existing[existing.index(marker):] if marker in existing else ""
        with open(a.out, "w") as f:
            f.write(report + ("\n" + tail if tail else ""))
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
