"""kdcache's cache format: schema, codec, manifest, streaming writer and reader, verify/inspect/merge.

Importing this package is cheap (numpy, pyarrow, fsspec); nothing here imports torch or vLLM.
"""

from formats.codec import CodecConfig
from formats.errors import ChecksumError, FormatError, IncompatibleCachesError, InputError, KDCacheError
from formats.example import IGNORE_INDEX, Example
from formats.manifest import load_manifest
from formats.reader import CacheReader
from formats.schema import FORMAT_VERSION
from formats.writer import CacheWriter

__all__ = [
    "CacheReader",
    "CacheWriter",
    "ChecksumError",
    "CodecConfig",
    "Example",
    "FORMAT_VERSION",
    "FormatError",
    "IGNORE_INDEX",
    "IncompatibleCachesError",
    "InputError",
    "KDCacheError",
    "load_manifest",
]
