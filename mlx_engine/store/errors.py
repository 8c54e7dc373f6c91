"""The errors of extraction and of reading a store, each a message a user can act on.

They are ValueErrors (bad input, as the command line reports them) except a write
error, which is an OSError at heart: the run stopped, and what was committed is intact.
"""

from __future__ import annotations


class StoreError(ValueError):
    """An extraction request or a store folder that cannot be used; the message says why."""


class CorpusError(StoreError):
    """The corpus is missing, empty or malformed; the message names the file and line."""


class StoreMismatchError(StoreError):
    """The output folder holds another run (different settings), so it cannot be resumed."""


class StoreWriteError(RuntimeError):
    """Writing the store failed (disk full, permissions); the complete shards are intact."""
