"""A real S3-compatible server on loopback for the object-store tests: moto's server in a child process.

moto answers If-None-Match: * and stale If-Match with 412 on PutObject (as AWS S3 does), but checks
the condition and writes the object in two steps; its threaded server could let two racing writers
both pass. Serving one request at a time makes each conditional write atomic, as a real store is.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import boto3

SERVE = """
import sys
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
app = DomainDispatcherApplication(create_backend_app)
server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.endpoint_url = f"http://127.0.0.1:{int(self.process.stdout.readline())}"
        self.bucket = "reft-tests"
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def fresh_url(self) -> str:
        """A store location no other test uses."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex}"

    def environment(self) -> dict[str, str]:
        return {**CREDENTIALS, "REFT_S3_ENDPOINT_URL": self.endpoint_url}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
