"""A real S3 API on loopback, for trying object-storage stores on a machine without a bucket.

    with LoopbackS3() as s3:              # moto's server on a free 127.0.0.1 port, its own credentials
        s3.bucket("acts")                 -> "s3://acts"
        s3.env                            the environment a child process needs to reach it

The server is moto's (`moto[server]`, the dev extra): an in-memory S3 that honours the conditional
writes (`If-None-Match`, `If-Match`) the store's locks rely on. Entering sets the AWS_* variables of
`env` in this process too, so that s3fs here reaches it; leaving restores them and stops the server.
Used by the tests, `make s3-demo` and `make bench-data`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

# test credentials: moto accepts any; these are distinctive so that tests can look for them in files
KEY_ID = "AKIALOOPBACKTESTKEY1"
SECRET = "loopback-secret-that-must-never-appear-in-a-file"


class LoopbackS3:
    def __init__(self, start_timeout: float = 30.0):
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> LoopbackS3:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + self.start_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError("the loopback S3 server (python -m moto.server) did not start; "
                                       "is moto[server] installed (`make setup`)?") from None
                time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                    # never the user's own profile: only these credentials reach this server
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return self

    def bucket(self, name: str) -> str:
        """Create the bucket `name` (a valid S3 bucket name); its URL."""
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint, key=KEY_ID,
                          secret=SECRET).mkdir(name)
        return f"s3://{name}"

    def __exit__(self, *exc: object) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
