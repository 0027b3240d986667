"""Shared fixtures. Test audio is generated here (numpy, sox, espeak-ng), never downloaded."""

import sys
from pathlib import Path

# Test helper modules (audio.py, s3server.py, …) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


# -- S3 (a real SeaweedFS server; see s3server.py) ----------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server shared by the whole session; give each test its own bucket."""
    from s3server import S3Server  # botocore and the weed binary only for tests that use S3

    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the shared server."""
    return s3_server.create_bucket()


@pytest.fixture
def s3_own_server(tmp_path_factory):
    """A SeaweedFS S3 server for this test alone (it may stop and restart it)."""
    from s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3own")) as server:
        yield server


# -- PostgreSQL (a real server from Debian's binaries; see postgres.py) -------------------

@pytest.fixture(scope="module")
def postgres_server():
    """One PostgreSQL for the test module; give each test its own database (fresh_database)."""
    from postgres import started

    yield from started()


@pytest.fixture
def postgres_own_server():
    """A PostgreSQL for this test alone: it may stop, kill or restart it."""
    from postgres import started

    yield from started()
