"""Where finished recordings live: a local directory (default) or an S3 bucket.

Every recording is first written to a spool file on local disk while it is made; a
backend's `Upload` turns that spool into a stored object (rename for local, multipart for
S3). Backends also sign short-lived GET URLs and delete objects.
"""

from mediaserver.storage.base import ObjectInfo, Storage, Upload, object_key
from mediaserver.storage.spool import Spool

__all__ = ["ObjectInfo", "Spool", "Storage", "Upload", "object_key"]
