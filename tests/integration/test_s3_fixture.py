"""The S3 fixture really is an HTTP server on loopback that s3fs (in this and child processes) can use."""

import subprocess
import sys
from urllib.parse import urlparse

from data_loaders import storage


def test_endpoint_is_loopback_and_roundtrips(s3_endpoint, s3_bucket):
    assert urlparse(s3_endpoint).hostname == "127.0.0.1"
    fs, path = storage.resolve(f"{s3_bucket}/dir/hello.bin")
    storage.write_bytes_atomic(fs, path, b"x" * 1000)
    assert fs.cat_file(path) == b"x" * 1000
    # A separate process sees the same object through AWS_ENDPOINT_URL alone.
    code = f"import fsspec; print(len(fsspec.open('{s3_bucket}/dir/hello.bin','rb').open().read()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000"
