from __future__ import annotations

import os
import uuid

import pytest

from tests.objstore.server import S3Server

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    srv = S3Server()
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=srv.url)
    yield srv
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket per test: s3://NAME."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}"
