import pytest
from .format_helpers import make_example, write_cache


@pytest.fixture
def examples(rng):
    return [make_example(rng, i) for i in range(40)]


@pytest.fixture
def cache(tmp_path, examples):
    path = tmp_path / "cache"
    write_cache(path, examples, rejects=[("bad-1", "no assistant turn"), ("bad-2", "unknown role: 'bot'")])
    return path


# formats/template.py is tested on the real teacher tokenizer and Tulu rows (the cache_teacher fixtures).
from ..cache_teacher.conftest import sample_rows, smollm2_dir, tokenizer  # noqa: E402,F401


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server (moto) on loopback: (s3fs filesystem, storage_options), bucket `kd-bucket`."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import fsspec
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()  # moto's buckets are process-wide state, not the server's: start from none

    # port 0: the server binds a free port itself (no window between choosing a port and binding it)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("kd-bucket")
    yield fs, options
    server.stop()
    moto_api_backend.reset()
