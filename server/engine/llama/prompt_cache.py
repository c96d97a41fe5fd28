"""Prefixes evicted from the KV cache, kept as llama.cpp sequence state in host RAM (bounded,
least recently used first) and optionally on disk across restarts: a long system prompt or
document is read once per server, not once per slot (llama-server's `--cache-ram`).

The slot pool saves a slot's whole cache here before it overwrites it, and restores the entry
sharing the longest prefix with a new prompt when that beats every slot's own cache.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.llama.prefix import BLOCK, PrefixIndex, common_prefix

log = logging.getLogger("server.engine")

_MAGIC = b"GGSERVE-KV1\n"


@dataclass(frozen=True)
class PromptCacheConfig:
    """How much a model's prompt cache may keep, and where."""

    ram_bytes: int = 0  # 0: no states in RAM
    min_tokens: int = 256  # shorter caches are cheaper to read again than to save
    disk_dir: Path | None = None  # also write states here, and find them after a restart
    disk_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.ram_bytes or self.disk_dir)


@dataclass(eq=False)
class Saved:
    """One saved sequence: its tokens (from position 0) and its state, in RAM or on disk."""

    tag: str | None  # what the KV was computed under (a LoRA adapter), None for the base
    tokens: list[int]
    size: int  # bytes of state
    data: bytearray | None = None  # None: on disk only
    path: Path | None = None
    used: float = field(default_factory=time.monotonic)


class PromptCache:
    """Saved sequences of one model's context; used by its scheduler thread only.

    `fingerprint` names what a state depends on (the model file, the KV cache's types and
    layout): a disk entry written under another fingerprint is ignored.
    """

    def __init__(self, config: PromptCacheConfig, fingerprint: str) -> None:
        self.ram_bytes, self.min_tokens = config.ram_bytes, config.min_tokens
        self._entries: list[Saved] = []
        self._index: PrefixIndex[Saved] = PrefixIndex()
        self._disk = None if config.disk_dir is None else \
            _Disk(config.disk_dir, config.disk_bytes, fingerprint)
        if self._disk:
            for saved in self._disk.scan():
                self._add(saved)
        self.hits = 0  # restores that succeeded
        self.restored_tokens = 0

    @property
    def durable(self) -> bool:
        """Whether entries outlive the process (on disk)."""
        return self._disk is not None

    @property
    def ram_used(self) -> int:
        return sum(s.size for s in self._entries if s.data is not None)

    @property
    def disk_used(self) -> int:
        return sum(s.size for s in self._entries if s.path is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt: list[int], tag: str | None) -> tuple[Saved, int] | None:
        """The entry sharing the longest prefix with `prompt` under `tag`, and how long."""
        among = {s for s in self._entries if s.tag == tag}
        if not among:
            return None
        candidates, depth = self._index.deepest(prompt, tag, among)
        head = prompt[:(depth + 1) * BLOCK]
        best: Saved = max(candidates, key=lambda s: (common_prefix(s.tokens[:len(head)], head),
                                              -len(s.tokens)))
        shared = common_prefix(best.tokens, prompt)
        return (best, shared) if shared else None

    def keeps(self, tokens: list[int], tag: str | None) -> bool:
        """Whether saving `tokens` would add nothing: too short, or an entry covers them."""
        if len(tokens) < self.min_tokens:
            return True
        found = self.longest(tokens, tag)
        return found is not None and found[1] == len(tokens)

    def fits(self, size: int) -> bool:
        """Whether a state of `size` bytes fits the bounds at all (a larger one would only push
        out everything else, as llama-server's cache skips it too)."""
        return size <= max(self.ram_bytes, self._disk.limit if self._disk else 0)

    def put(self, tag: str | None, tokens: list[int], data: bytearray) -> None:
        """Keep `data`, the state of a sequence holding `tokens`; entries that are prefixes
        of it go (it answers for them)."""
        for old in [s for s in self._entries if s.tag == tag and len(s.tokens) <= len(tokens)]:
            if common_prefix(old.tokens, tokens) == len(old.tokens):
                self._remove(old)
        saved = Saved(tag, list(tokens), len(data), data if self.ram_bytes else None)
        if self._disk:
            saved.path = self._disk.write(saved, data)
        self._add(saved)
        self._bound()

    def load(self, saved: Saved) -> bytearray | None:
        """The entry's state (read from disk if it is there only); None if it is gone."""
        saved.used = time.monotonic()
        if saved.data is not None:
            return saved.data
        data = self._disk.read(saved) if self._disk and saved.path else None
        if data is None:
            self._remove(saved)
        return data

    def close(self) -> None:
        """Finish writing to disk."""
        if self._disk:
            self._disk.close()

    def _add(self, saved: Saved) -> None:
        self._entries.append(saved)
        self._index.put(saved, saved.tokens, saved.tag)

    def _remove(self, saved: Saved) -> None:
        if saved not in self._entries:
            return
        self._entries.remove(saved)
        self._index.drop(saved)
        if saved.path is not None and self._disk:
            self._disk.delete(saved.path)

    def _bound(self) -> None:
        """Drop the least recently used states past the RAM bound (kept on disk if there is
        one) and the least recently used entries past the disk bound."""
        by_age = sorted(self._entries, key=lambda s: s.used)
        ram = self.ram_used
        for saved in by_age:
            if ram <= self.ram_bytes:
                break
            if saved.data is not None:
                ram -= saved.size
                saved.data = None
                if saved.path is None:
                    self._remove(saved)
        if self._disk:
            disk = self.disk_used
            for saved in by_age:
                if disk <= self._disk.limit:
                    break
                if saved.path is not None and saved in self._entries:
                    disk -= saved.size
                    self._remove(saved)


class _Disk:
    """Entries as files of one directory: a header line (JSON), the tokens, the state.

    Writes go to a thread of their own so that the scheduler does not wait for the disk.
    """

    def __init__(self, directory: Path, limit: int, fingerprint: str) -> None:
        self.dir, self.limit, self._fingerprint = directory, limit, fingerprint
        directory.mkdir(parents=True, exist_ok=True)
        self._queue: queue.SimpleQueue[tuple[Path, bytes, bytearray] | Path | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_all, name="prompt-cache-disk",
                                        daemon=True)
        self._thread.start()

    def scan(self) -> list[Saved]:
        """The directory's entries for this fingerprint (their states stay on disk)."""
        found = []
        for path in sorted(self.dir.glob("*.kv")):
            try:
                with path.open("rb") as file:
                    header = self._header(file.readline(), file.readline())
                    if header is None:
                        continue
                    tokens = array.array("i")
                    tokens.frombytes(file.read(4 * header["n_tokens"]))
                found.append(Saved(header["tag"], tokens.tolist(), header["size"], None, path,
                                   path.stat().st_mtime - time.time() + time.monotonic()))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("prompt cache: skipping unreadable %s", path)
        return found

    def _header(self, magic: bytes, line: bytes) -> dict[str, Any] | None:
        if magic != _MAGIC:
            return None
        header: dict[str, Any] = json.loads(line)
        return header if header.get("fingerprint") == self._fingerprint else None

    def write(self, saved: Saved, data: bytearray) -> Path:
        key = hashlib.sha256(json.dumps([self._fingerprint, saved.tag, saved.tokens])
                             .encode()).hexdigest()[:32]
        path = self.dir / f"{key}.kv"
        header = json.dumps({"fingerprint": self._fingerprint, "tag": saved.tag,
                             "n_tokens": len(saved.tokens), "size": len(data)}).encode()
        tokens = array.array("i", saved.tokens).tobytes()
        self._queue.put((path, _MAGIC + header + b"\n" + tokens, data))
        return path

    def read(self, saved: Saved) -> bytearray | None:
        assert saved.path is not None
        try:
            with saved.path.open("rb") as file:
                header = self._header(file.readline(), file.readline())
                if header is None or header["size"] != saved.size:
                    return None
                file.seek(4 * header["n_tokens"], 1)
                data = bytearray(saved.size)
                if file.readinto(data) != saved.size or file.read(1):
                    return None
            saved.path.touch()
        except (OSError, ValueError, KeyError):
            return None
        return data

    def delete(self, path: Path) -> None:
        self._queue.put(path)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if isinstance(item, Path):
                    item.unlink(missing_ok=True)
                    continue
                path, head, data = item
                partial = path.with_suffix(".part")
                with partial.open("wb") as file:
                    file.write(head)
                    file.write(data)
                partial.replace(path)  # whole or absent, whatever happens to the process
            except OSError as exc:
                log.warning("prompt cache: could not write to %s: %s", self.dir, exc)
