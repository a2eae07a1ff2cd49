"""Object storage against moto's S3 server over HTTP, and the local folder store."""

from __future__ import annotations

import httpx
import pytest

from jobs.errors import ConfigError, InputError
from jobs.settings import Settings
from jobs.storage import LocalStore, open_store


@pytest.fixture
def settings(s3_endpoint) -> Settings:
    return Settings(s3={"endpoint_url": s3_endpoint, "region": "us-east-1", "presign_expires": 300})


def test_s3_put_get_list_and_presigned_url(settings, bucket):
    store = open_store(f"s3://{bucket}/runs/", settings)
    uri = store.put("j1/a.png", b"\x89PNG-bytes", "image/png", {"seed": "7"})
    assert uri == f"s3://{bucket}/runs/j1/a.png"
    assert store.get("j1/a.png") == b"\x89PNG-bytes"
    assert store.get("j1/missing.png") is None
    assert list(store.keys("j1/")) == ["j1/a.png"]
    url = store.url("j1/a.png")
    assert url.startswith(settings.s3_endpoint()) and "Signature" in url
    assert httpx.get(url).content == b"\x89PNG-bytes"  # the presigned URL really serves the object
    with pytest.raises(InputError, match="over the 4-byte limit"):
        store.get("j1/a.png", max_bytes=4)


def test_presigned_links_name_the_public_endpoint_and_still_serve_the_object(settings, bucket):
    """Workers reach S3 as http://minio:9000 in compose; a client on the host reaches it at 127.0.0.1:9000. Here
    the store writes through one address of the server and signs links for another (localhost vs 127.0.0.1)."""
    public = settings.s3_endpoint().replace("127.0.0.1", "localhost")
    store = open_store(
        f"s3://{bucket}/pub/",
        settings.model_copy(update={"s3": settings.s3.model_copy(update={"public_endpoint_url": public})}),
    )
    store.put("a.png", b"public-bytes", "image/png")
    url = store.url("a.png")
    assert url.startswith(f"{public}/{bucket}/pub/a.png?") and "Signature" in url
    assert httpx.get(url).content == b"public-bytes"  # signed for the host it names


def test_s3_missing_bucket_is_a_configuration_error(settings):
    with pytest.raises(ConfigError, match="NoSuchBucket"):
        open_store("s3://no-such-bucket-here/x", settings).put("k", b"x", "text/plain")


def test_local_store_writes_atomically_and_refuses_keys_that_escape(tmp_path):
    store = LocalStore(str(tmp_path))
    path = store.put("j/a.txt", b"hello", "text/plain")
    assert store.get("j/a.txt") == b"hello" and path == str(tmp_path / "j" / "a.txt")
    assert list(store.keys("j/")) == ["j/a.txt"]
    with pytest.raises(ConfigError, match="escapes"):
        store.put("../outside.txt", b"x", "text/plain")
