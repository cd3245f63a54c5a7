"""Typed errors. Every message says what went wrong, where, and what to do about it."""

from __future__ import annotations


class KDCacheError(Exception):
    """Base of every error kdcache reports to a user (the CLI prints these without a traceback)."""


class FormatError(KDCacheError, ValueError):
    """A cache on disk does not match the format: bad schema, bad values, unknown version."""


class ChecksumError(FormatError):
    """A shard's bytes differ from the sha256 the manifest recorded."""


class IncompatibleCachesError(KDCacheError):
    """Caches that cannot be combined or consumed together (teacher, tokenizer, codec differ)."""


class InputError(KDCacheError, ValueError):
    """Bad user input: a missing file, an unknown option value, a wrong tokenizer."""
