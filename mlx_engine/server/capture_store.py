"""Whole captures kept for download, bounded by count and by bytes (least recently used out).

A response names its capture id; the client fetches the safetensors file afterwards.
The store holds finished files as bytes (built on the engine thread), so serving one
never touches MLX, and the bounds keep a busy server's memory flat.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StoredCapture:
    capture_id: str
    model: str
    data: bytes
    created: int

    @property
    def size(self) -> int:
        return len(self.data)


class CaptureStore:
    """Thread-safe LRU of safetensors files."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: "OrderedDict[str, StoredCapture]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, capture_id: str, model: str, data: bytes) -> bool:
        """Keep a capture, evicting the least recently used; False if it alone exceeds the byte bound."""
        if len(data) > self.max_bytes or self.max_items < 1:
            return False
        item = StoredCapture(capture_id, model, data, int(time.time()))
        with self._lock:
            old = self._items.pop(capture_id, None)
            if old is not None:
                self._bytes -= old.size
            self._items[capture_id] = item
            self._bytes += item.size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.size
        return True

    def get(self, capture_id: str) -> Optional[StoredCapture]:
        with self._lock:
            item = self._items.get(capture_id)
            if item is not None:
                self._items.move_to_end(capture_id)
            return item

    def delete(self, capture_id: str) -> bool:
        with self._lock:
            item = self._items.pop(capture_id, None)
            if item is None:
                return False
            self._bytes -= item.size
            return True

    def list(self) -> list[StoredCapture]:
        with self._lock:
            return list(self._items.values())

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
