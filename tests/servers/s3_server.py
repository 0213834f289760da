"""A real S3 HTTP endpoint on 127.0.0.1 for tests: moto's server mode in its own process.

``S3Server`` starts ``python -m moto.server`` on a free port and waits until it answers; ``stop()``
kills it (an outage), ``start()`` again brings up an empty one (moto keeps objects in memory).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any, Self

import httpx

from tests.waiting import wait_until

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "modelbus-test", "AWS_SECRET_ACCESS_KEY": "modelbus-test-secret",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], env=env | CREDENTIALS,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: httpx.get(self.url + "/moto-api/", timeout=2).status_code < 500, 60,
                   "the moto S3 server to answer", ignore=(httpx.HTTPError,))
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> Any:
        import boto3
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
