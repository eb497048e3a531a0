#!/usr/bin/env python3
"""blocksnap tracking benchmark: freeze windows that do not grow with the
device, and increments that cost what changed. Run as root through
bench/run.sh (after the main benchmark), or alone:

    python3 bench/tracking.py                 # 4, 16 and 64 GiB, writes BENCHMARKS.md
    python3 bench/tracking.py --quick --out - # 1 GiB only, prints (CI)

Every figure comes from this run, side by side.
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "blocksnap")
DAEMON = os.path.join(ROOT, "target", "release", "blocksnapd")
GIB = 1 << 30
MIB = 1 << 20
BS = 4096
START, END = "<!-- tracking -->", "<!-- /tracking -->"


def sh(*args, **kw):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def p99(xs):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


class Writer:
    """Appends 64 KiB records with fsync at a steady rate; keeps each
    write+fsync latency with the time it started."""

    def __init__(self, path, rate_mib_s=4.0):
        self.path, self.rate = path, rate_mib_s
        self.samples = []  # (start, latency)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        rec = os.urandom(64 * 1024)
        interval = len(rec) / (self.rate * MIB)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        n = 0
        nxt = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            os.write(fd, rec)
            os.fsync(fd)
            self.samples.append((t0, time.monotonic() - t0))
            n += 1
            if n % 256 == 0:
                os.ftruncate(fd, 0)
            nxt += interval
            d = nxt - time.monotonic()
            if d > 0:
                time.sleep(d)
            else:
                nxt = time.monotonic()
        os.close(fd)

    def between(self, a, b):
        return [lat for (t, lat) in self.samples if a <= t <= b]

    def close(self):
        self.stop.set()
        self.t.join()


def timed_rss(*argv):
    """Run the CLI; its wall time and peak RSS."""
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, BIN, *argv],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"blocksnap {' '.join(argv)} failed: {p.stderr}")
        peak = int(rss.read().strip().splitlines()[-1]) * 1024
    return time.monotonic() - t0, peak


def take_json(dev, chain, *extra):
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, BIN, "chain", "take", dev, chain, "--json", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"chain take failed: {p.stderr}")
        peak = int(rss.read().strip().splitlines()[-1]) * 1024
    dt = time.monotonic() - t0
    out = p.stdout
    info = json.loads(out[: out.rstrip().rfind("\n")])
    return dt, peak, info


def freeze_case(work, size, quick):
    """Mounted ext4 of `size` (sparse image) with data and a steady writer:
    freeze window of a take, and the writer's p99 during it vs without."""
    img = os.path.join(work, f"fs-{size}.img")
    with open(img, "wb") as f:
        f.truncate(size)
    dev = sh("losetup", "--find", "--show", img).strip()
    mnt = os.path.join(work, f"mnt-{size}")
    os.mkdir(mnt)
    try:
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, mnt)
        data = (64 if quick else 1024) * MIB
        for i in range(data // (16 * MIB)):
            with open(os.path.join(mnt, f"d{i}"), "wb") as f:
                f.write(os.urandom(16 * MIB))
        os.sync()
        chain = os.path.join(work, f"fs-{size}.chain")
        intents = os.path.join(work, "intents")
        w = Writer(os.path.join(mnt, "wlog"))
        time.sleep(2 if quick else 5)
        base_end = time.monotonic()
        baseline = w.between(0, base_end)
        take_json(dev, chain, "--intent-dir", intents)  # the first snapshot
        t0 = time.monotonic()
        dt, peak, info = take_json(dev, chain, "--intent-dir", intents)
        t1 = time.monotonic()
        during = w.between(t0, t1)
        w.close()
        return {
            "size": size, "freeze_ms": info["freeze_ms"], "take_s": dt, "rss": peak,
            "rounds": info["take"]["rounds"], "quiesced_blocks": info["take"]["quiesced_blocks"],
            "p99_base_ms": p99(baseline) * 1000, "p99_snap_ms": p99(during) * 1000,
            "max_snap_ms": max(during) * 1000 if during else float("nan"),
            "writes_during": len(during),
        }
    finally:
        subprocess.run(["umount", mnt])
        subprocess.run(["losetup", "-d", dev])
        os.remove(img)


def daemon_snapshot(sock, vol, timeout=3600):
    url = "http://localhost/v1/bench"
    body = json.dumps({"snapshot": {"volume_id": vol, "display_name": "b"}})
    out = sh("curl", "-s", "--unix-socket", sock, "-H", "X-Auth-Token: benchtoken0", "-H",
             "Content-Type: application/json", "-X", "POST", "-d", body, f"{url}/snapshots")
    sid = json.loads(out)["snapshot"]["id"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = json.loads(sh("curl", "-s", "--unix-socket", sock, "-H", "X-Auth-Token: benchtoken0", f"{url}/snapshots/{sid}"))["snapshot"]
        if s["status"] == "available":
            return sid
        if s["status"] == "error":
            raise SystemExit(f"daemon snapshot failed: {s}")
        time.sleep(0.2)
    raise SystemExit("daemon snapshot timed out")


def increment_case(work, size, fraction):
    """A `fraction` increment of a raw `size` device: tracked (blocksnapd)
    against a full-scan increment (`chain take --no-tracking`)."""
    img = os.path.join(work, "raw.img")
    with open(img, "wb") as f:
        f.truncate(size)
    dev = sh("losetup", "--find", "--show", img).strip()
    state = os.path.join(work, "state")
    sock = os.path.join(work, "d.sock")
    cfg = os.path.join(work, "d.toml")
    with open(cfg, "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nstate_dir = "{state}"\n\n[[tokens]]\ntenant = "bench"\ntoken = "benchtoken0"\n\n'
                f'[[volumes]]\nid = "raw"\ndevice = "{dev}"\nverify_every = 0\n')
    d = subprocess.Popen([DAEMON, "--config", cfg], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "d.log"), "w"),
                         env={**os.environ, "BLOCKSNAP_LOG": "info"})
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        rng = random.Random(11)
        fd = os.open(dev, os.O_WRONLY)
        for b in rng.sample(range(size // BS), 2000):
            os.pwrite(fd, os.urandom(BS), b * BS)
        os.fsync(fd)
        daemon_snapshot(sock, "raw")
        fchain = os.path.join(work, "full.chain")
        take_json(dev, fchain, "--no-tracking")
        count = int(size // BS * fraction)
        for b in rng.sample(range(size // BS), count):
            os.pwrite(fd, os.urandom(BS), b * BS)
        os.fsync(fd)
        os.close(fd)
        subprocess.run(["blockdev", "--flushbufs", dev])
        sid = daemon_snapshot(sock, "raw")
        tracked = [s for s in json.loads(sh(BIN, "chain", "list", os.path.join(state, "chains", "raw.chain"), "--json")) if s["id"] == sid][0]
        dt, peak, full = take_json(dev, fchain, "--no-tracking")
        return {
            "size": size, "changed": count * BS,
            "tracked_s": tracked["scan_ms"] / 1000, "tracked_method": tracked["take"]["method"],
            "tracked_stored": tracked["stored_bytes"], "tracked_changed": tracked["changed_bytes"],
            "full_s": full["scan_ms"] / 1000, "full_rss": peak, "full_stored": full["stored_bytes"],
        }
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait()
        subprocess.run(["losetup", "-d", dev])
        os.remove(img)


def full_data_case(work, size):
    """A full first snapshot of an image holding `size` of data (no zero
    blocks): its peak RSS must not grow with what it stores."""
    img = os.path.join(work, "full-data.img")
    chunk = os.urandom(16 * MIB)
    with open(img, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    chain = os.path.join(work, "full-data.chain")
    out = os.path.join(work, "full-data.restored")
    try:
        dt, peak, info = take_json(img, chain, "--no-tracking")
        os.remove(img)
        # Restoring and verifying it: they too must not hold what it stores
        # (each stored block's fingerprint and crc32 are 12 bytes).
        rdt, rpeak = timed_rss("chain", "restore", chain, info["id"], out)
        os.remove(out)
        vdt, vpeak = timed_rss("chain", "verify", chain)
        return {"size": size, "take_s": dt, "rss": peak, "stored": info["stored_bytes"],
                "restore_s": rdt, "restore_rss": rpeak, "verify_s": vdt, "verify_rss": vpeak}
    finally:
        for p in (img, out, chain, chain + ".fpmap"):
            if os.path.exists(p):
                os.remove(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 GiB only (CI)")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--sizes", default="4G,16G,64G")
    ap.add_argument("--size", default=None, help="ignored (bench/run.py's option)")
    ap.add_argument("--runs", default=None, help="ignored (bench/run.py's option)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--increment-only", action="store_true", help="only the 1%% increment at the largest size, printed")
    ap.add_argument("--full-data-only", action="store_true", help="only the full snapshots of images full of data, printed")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root")
    sizes = ["1G"] if a.quick else a.sizes.split(",")
    sizes = [int(s[:-1]) * GIB for s in sizes]
    work = tempfile.mkdtemp(prefix="blocksnap-track-", dir=a.workdir or "/var/tmp")
    started = time.time()
    try:
        freezes = []
        full_data = []
        for size in ([256 * MIB, GIB] if a.quick else [2 * GIB, 8 * GIB]) if not a.increment_only else []:
            print(f"full snapshot of {human(size)} of data", flush=True)
            full_data.append(full_data_case(work, size))
        if a.full_data_only:
            sizes = []
        if a.increment_only:
            sizes_f = []
        else:
            sizes_f = sizes
        for size in sizes_f:
            print(f"freeze window at {human(size)}", flush=True)
            freezes.append(freeze_case(work, size, a.quick))
        if sizes:
            print(f"1% increment at {human(sizes[-1])}", flush=True)
            inc = increment_case(work, sizes[-1], 0.01)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    cmd = "python3 bench/tracking.py " + " ".join(sys.argv[1:])
    fd_lines = ["| data in the image | whole take | stored | take peak RSS | restore | restore peak RSS | verify | verify peak RSS |",
                "|---|---|---|---|---|---|---|---|"]
    for c in full_data:
        fd_lines.append(f"| {human(c['size'])} | {c['take_s']:.1f} s | {human(c['stored'])} | {human(c['rss'])} | "
                        f"{c['restore_s']:.1f} s | {human(c['restore_rss'])} | {c['verify_s']:.1f} s | {human(c['verify_rss'])} |")
    if a.full_data_only:
        print(f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with `{cmd.strip()}` ({elapsed / 60:.1f} minutes):\n")
        print("\n".join(fd_lines))
        return
    if a.increment_only:
        ratio = inc["tracked_s"] / inc["full_s"]
        print(f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with `{cmd.strip()}` ({elapsed / 60:.1f} minutes):\n")
        print("| increment | take time | stored | peak RSS |\n|---|---|---|---|")
        print(f"| tracked (blocksnapd, method `{inc['tracked_method']}`) | {inc['tracked_s']:.2f} s | {human(inc['tracked_stored'])} for {human(inc['tracked_changed'])} changed | - |")
        print(f"| full scan (`chain take --no-tracking`) | {inc['full_s']:.2f} s | {human(inc['full_stored'])} | {human(inc['full_rss'])} |")
        print(f"\n- tracked / full-scan time: {ratio:.3f} (target ≤ 0.1): {'met' if ratio <= 0.1 else 'MISSED'}")
        return
    L = [START, "## Write tracking: freeze windows and increments\n"]
    L.append(f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with "
             f"`{cmd.strip()}` ({elapsed / 60:.1f} minutes) on {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}.\n")
    L.append("Mounted ext4 on a loop device over a sparse image, "
             f"{'64 MiB' if a.quick else '1 GiB'} of data, a writer appending 64 KiB records with fsync at 4 MiB/s; "
             "`chain take` (tracking during its own run; the second of two takes is measured):\n")
    L.append("| volume | freeze window | target | live rounds | blocks re-read frozen | whole take | writer p99 without | writer p99 during | writer max during | take peak RSS |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for f in freezes:
        ok = "met" if f["freeze_ms"] <= 100 else "MISSED"
        L.append(f"| {human(f['size'])} | {f['freeze_ms']:.1f} ms | ≤ 100 ms: {ok} | {f['rounds']} | {f['quiesced_blocks']} | "
                 f"{f['take_s']:.1f} s | {f['p99_base_ms']:.1f} ms | {f['p99_snap_ms']:.1f} ms | {f['max_snap_ms']:.1f} ms | {human(f['rss'])} |")
    ratio = inc["tracked_s"] / inc["full_s"]
    limit = 1.02 * inc["tracked_changed"] + 65536
    L.append(f"\n1% increment of a {human(inc['size'])} raw loop device ({human(inc['changed'])} rewritten at random 4 KiB blocks):\n")
    L.append("| increment | take time | stored | peak RSS |")
    L.append("|---|---|---|---|")
    L.append(f"| tracked (blocksnapd, method `{inc['tracked_method']}`) | {inc['tracked_s']:.2f} s | {human(inc['tracked_stored'])} for {human(inc['tracked_changed'])} changed | - |")
    L.append(f"| full scan (`chain take --no-tracking`) | {inc['full_s']:.2f} s | {human(inc['full_stored'])} | {human(inc['full_rss'])} |")
    if inc["size"] >= 64 * GIB:
        verdict = "met" if ratio <= 0.1 else "MISSED"
    else:
        # The target is for 64 GiB; on a small device fixed costs (opening,
        # the map, two fsyncs) are most of a take and the ratio says little.
        verdict = f"not judged at {human(inc['size'])}: the target is for 64 GiB"
    L.append(f"\n- tracked / full-scan time: {ratio:.3f} (target ≤ 0.1): {verdict}")
    L.append(f"- stored by the tracked increment: {human(inc['tracked_stored'])}, limit 1.02 x changed + 64 KiB = {human(limit)}: "
             f"{'met' if inc['tracked_stored'] <= limit else 'MISSED'}")
    big = max(freezes, key=lambda f: f["size"])
    rss = max(big["rss"], inc["full_rss"])
    L.append(f"- peak RSS of a take at {human(big['size'])}: {human(rss)} (target ≤ 64 MiB): {'met' if rss <= 64 * MIB else 'MISSED'}")
    L.append("\nA full first snapshot (`chain take --no-tracking`) of an image file holding only data, no zero blocks: "
             "what a take holds must not grow with what it stores either (the segment's index is 12 bytes a stored block):\n")
    L.extend(fd_lines)
    fd_rss = max(c["rss"] for c in full_data)
    L.append(f"\n- peak RSS of a full snapshot of {human(full_data[-1]['size'])} of data: {human(fd_rss)} (target ≤ 64 MiB): "
             f"{'met' if fd_rss <= 64 * MIB else 'MISSED'}")
    r_rss = max(max(c["restore_rss"], c["verify_rss"]) for c in full_data)
    L.append(f"- peak RSS of restoring and verifying it: {human(r_rss)} (held to the take's 64 MiB): "
             f"{'met' if r_rss <= 64 * MIB else 'MISSED'}")
    L.append(END)
    report = "\n".join(L) + "\n"
    print(report)
    if a.out != "-":
        text = open(a.out).read() if os.path.exists(a.out) else ""
        if START in text and END in text:
            text = text[: text.index(START)] + report + text[text.index(END) + len(END) + 1:]
        else:
            text = text.rstrip("\n") + "\n\n" + report
        with open(a.out, "w") as f:
            f.write(text)
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
