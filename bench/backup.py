#!/usr/bin/env python3
"""blocksnap backup benchmark: backups to an S3 server (moto on 127.0.0.1).

Run through bench/backup.sh. Measures, on an image of about 60% random
bytes and 40% zeros in 1 MiB runs:

- bytes sent per incremental backup against the changed bytes (target: at
  most 1.02 x changed + 64 KiB);
- full-backup time against `aws s3 cp` of a file of the same number of
  bytes to the same server (the ratio);
- restore from the bucket against `chain restore` of the same snapshot from
  the local chain (the ratio).

Every number it prints comes from this run. Needs no root (image files).
"""

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "blocksnap")
VENV = os.path.join(ROOT, ".venv-s3")
MIB = 1 << 20
BS = 4096
BUCKET = "blocksnap-bench"


def run(argv, env=None):
    t0 = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr}")
    return dt, p.stdout


def make_image(path, size, seed):
    rng = random.Random(seed)
    zero = bytes(MIB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(MIB, left)
            f.write(os.urandom(n) if rng.random() < 0.6 else zero[:n])
            left -= n


def rewrite(path, size, fraction, rng):
    blocks = rng.sample(range(size // BS), int(size // BS * fraction))
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in blocks:
            os.pwrite(fd, os.urandom(BS), b * BS)
    finally:
        os.close(fd)


def median(xs):
    return statistics.median(xs)


def spread(xs):
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def human(n):
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


class Server:
    def __init__(self):
        self.p = subprocess.Popen(
            [os.path.join(VENV, "bin", "python"), os.path.join(ROOT, "tests", "s3server.py"), BUCKET],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.p.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit("the S3 server did not start; run scripts/install-deps.sh")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self):
        self.p.kill()
        self.p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--quick", action="store_true", help="128 MiB, one run")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"),
                    help="file whose backup section is replaced, or - for stdout")
    a = ap.parse_args()
    size = 128 * MIB if a.quick else parse_size(a.size)
    runs = 1 if a.quick else a.runs
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="blocksnap-bench-backup-", dir="/var/tmp")
    server = Server()
    try:
        rows, notes = bench(work, server, size, runs)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", work])
    took = (time.monotonic() - started) / 60
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    head = (
        f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC with "
        f"`{' '.join(['bench/backup.sh', *sys.argv[1:]])}` ({took:.1f} minutes) on {platform.node()}: "
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}. The S3 server is moto "
        f"(Python, in memory) on 127.0.0.1, the same for blocksnap and the AWS CLI. Image: "
        f"{human(size)} file, about 60% random bytes and 40% zeros in 1 MiB runs; remote with "
        f"16 MiB objects, 8 MiB parts, 4 requests in flight, no bandwidth limit. Each timing ran "
        f"{runs} time(s): median ± half the spread.\n"
    )
    text = head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"
    if a.out == "-":
        print(text)
        return
    with open(a.out) as f:
        old = f.read()
    start, end = "<!-- backup -->", "<!-- /backup -->"
    section = f"{start}\n## Backups to S3\n\n{text}{end}"
    if start in old:
        new = old[: old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    with open(a.out, "w") as f:
        f.write(new)
    print(text)


def bench(work, server, size, runs):
    creds = os.path.join(work, "creds.toml")
    with open(creds, "w") as f:
        f.write('access_key_id = "bench"\nsecret_access_key = "bench-secret"\n')
    os.chmod(creds, 0o600)
    key = os.path.join(work, "key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    cfg = os.path.join(work, "remotes.toml")
    with open(cfg, "w") as f:
        for name, extra in [("plain", ""), ("sealed", f'key_file = "{key}"\n')]:
            f.write(
                f'[[remotes]]\nname = "{name}"\nendpoint = "{server.endpoint}"\nbucket = "{BUCKET}"\n'
                f'prefix = "{name}"\ncredentials_file = "{creds}"\n{extra}\n'
            )
    img = os.path.join(work, "img")
    make_image(img, size, 1)
    rng = random.Random(2)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
               AWS_DEFAULT_REGION="us-east-1")
    aws = os.path.join(VENV, "bin", "aws")

    def backup(chain, snap, remote, volume, *extra):
        dt, out = run([BIN, "chain", "backup", chain, snap, "--config", cfg, "--remote", remote,
                       "--volume", volume, "--json", *extra])
        return dt, json.loads(out[: out.rstrip().rfind("\n")])

    rows = ["| case | blocksnap | baseline | baseline command | ratio |", "|---|---|---|---|---|"]
    notes = ["Bytes sent per backup (every request body: objects, manifest, lock):", ""]
    full_t, aws_t = {"plain": [], "sealed": []}, []
    restore_t, chain_restore_t = [], []
    chain = os.path.join(work, "c.chain")
    _, out = run([BIN, "chain", "take", img, chain])
    snap = out.strip().splitlines()[-1]
    uploaded = 0
    for r in range(runs):
        for remote in ["plain", "sealed"]:
            dt, o = backup(chain, snap, remote, f"full{r}")
            full_t[remote].append(dt)
            uploaded = o["uploaded_bytes"]
        # The same number of bytes, random, with the AWS CLI's defaults
        # (8 MiB multipart chunks, 10 threads).
        plainf = os.path.join(work, "plain.bin")
        with open(plainf, "wb") as f:
            f.write(os.urandom(uploaded))
        dt, _ = run([aws, "--endpoint-url", server.endpoint, "s3", "cp", plainf,
                     f"s3://{BUCKET}/awscli/{r}", "--only-show-errors"], env=env)
        aws_t.append(dt)
        os.remove(plainf)
    m_aws = median(aws_t)
    for remote in ["plain", "sealed"]:
        m = median(full_t[remote])
        rows.append(
            f"| full backup, {'encrypted' if remote == 'sealed' else 'not encrypted'}: {human(uploaded)} of data "
            f"| {m:.2f} s ± {spread(full_t[remote]):.2f} | {m_aws:.2f} s ± {spread(aws_t):.2f} "
            f"| `aws s3 cp` of {human(uploaded)} | {m / m_aws:.2f} |"
        )
    # Incrementals: scattered 4 KiB rewrites, into the volume "inc" whose
    # full backup comes first.
    _, base = backup(chain, snap, "plain", "inc")
    for frac in [0.0, 0.01, 0.10]:
        rewrite(img, size, frac, rng)
        _, out = run([BIN, "chain", "take", img, chain])
        s = out.strip().splitlines()[-1]
        dt, o = backup(chain, s, "plain", "inc")
        changed, sent = o["changed_bytes"], o["sent_bytes"]
        limit = 1.02 * changed + 65536
        notes.append(
            f"- incremental, {frac:.0%} of blocks rewritten: {human(changed)} changed, {human(sent)} sent "
            f"({sent / changed if changed else 0:.3f} x), in {dt:.2f} s "
            f"(target: at most 1.02 x changed + 64 KiB = {human(limit)}): {'met' if sent <= limit else 'NOT met'}"
        )
        last_snap, last_id = s, o["id"]
    # Restore: from the bucket (a new file) against the local chain.
    for r in range(runs):
        t = os.path.join(work, f"from-bucket-{r}")
        dt, _ = run([BIN, "backup", "restore", "--config", cfg, "plain", "inc", last_id, t])
        restore_t.append(dt)
        t2 = os.path.join(work, f"from-chain-{r}")
        dt, _ = run([BIN, "chain", "restore", chain, last_snap, t2])
        chain_restore_t.append(dt)
        if r == 0:
            same = subprocess.run(["cmp", t, t2]).returncode == 0
            if not same:
                raise SystemExit("the two restores differ")
        os.remove(t)
        os.remove(t2)
    mr, mc = median(restore_t), median(chain_restore_t)
    rows.append(
        f"| restore of the newest of 3 incrementals from the bucket | {mr:.2f} s ± {spread(restore_t):.2f} "
        f"| {mc:.2f} s ± {spread(chain_restore_t):.2f} | `blocksnap chain restore` from the local chain | {mr / mc:.2f} |"
    )
    return rows, notes


if __name__ == "__main__":
    main()
