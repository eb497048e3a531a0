#!/usr/bin/env python3
"""The S3 server the backup tests and the benchmark talk to: moto in server
mode on 127.0.0.1 with an ephemeral port, holding everything in memory.

    s3server.py BUCKET...

creates the buckets, prints "PORT <n>" once it serves, and exits when its
standard input closes: the process that started it ended, however it ended.
"""
import logging
import os
import sys

from moto.server import ThreadedMotoServer


def main():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    for bucket in sys.argv[1:]:
        s3.create_bucket(Bucket=bucket)
    print("PORT", port, flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()
        os._exit(0)


if __name__ == "__main__":
    main()
