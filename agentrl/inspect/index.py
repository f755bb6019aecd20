"""The viewer's bounded, in-memory index of recent trajectories: summaries plus compressed search text.

Memory is bounded by construction: at most ``max_rows`` rows, each a :class:`Summary` and at most
``text_chars`` characters of searchable text (zlib-compressed); the oldest rows are evicted first.
Full trajectories are never kept: the trajectory page reads its one message from the stream by sequence.
"""

from __future__ import annotations

import zlib
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

from agentrl.inspect.filters import TrajectoryFilter
from agentrl.inspect.summary import Record, Summary, VersionClock, searchable_text, summarize

__all__ = ["Entry", "TrajectoryIndex"]


@dataclass(frozen=True)
class Entry:
    summary: Summary
    text_z: bytes  # zlib-compressed searchable text (truncated to the index's text_chars)

    def text(self) -> str:
        return zlib.decompress(self.text_z).decode("utf-8", errors="replace")


class TrajectoryIndex:
    """Rows in stream order; newest-first filtered pages; lookups by group and task.

    ``on_add`` / ``on_evict`` callbacks (the live hub) see every row that enters or leaves.
    """

    def __init__(self, max_rows: int = 20_000, text_chars: int = 4_000) -> None:
        if max_rows < 1 or text_chars < 0:
            raise ValueError(f"index: max_rows={max_rows} must be >= 1 and text_chars={text_chars} >= 0")
        self.max_rows = max_rows
        self.text_chars = text_chars
        self.clock = VersionClock()
        self._rows: deque[Entry] = deque()
        self._by_seq: dict[int, Entry] = {}
        self._by_group: defaultdict[str, list[int]] = defaultdict(list)
        self._by_task: defaultdict[str, list[int]] = defaultdict(list)
        self.on_add: list[Callable[[Entry], None]] = []
        self.on_evict: list[Callable[[Entry], None]] = []
        self.text_bytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def head_seq(self) -> int:
        return self._rows[-1].summary.seq if self._rows else 0

    def add(self, record: Record) -> Entry:
        """Index ``record`` (an already indexed sequence is ignored) and evict the oldest rows past the bound."""
        if record.seq in self._by_seq:
            return self._by_seq[record.seq]
        text = searchable_text(record.traj)[: self.text_chars]
        entry = Entry(summarize(record, self.clock), zlib.compress(text.encode(), 1))
        self._rows.append(entry)
        s = entry.summary
        self._by_seq[s.seq] = entry
        self._by_group[s.group_id].append(s.seq)
        self._by_task[s.task_id].append(s.seq)
        self.text_bytes += len(entry.text_z)
        for callback in self.on_add:
            callback(entry)
        while len(self._rows) > self.max_rows:
            self._evict()
        return entry

    def _evict(self) -> None:
        entry = self._rows.popleft()
        s = entry.summary
        del self._by_seq[s.seq]
        for table, key in ((self._by_group, s.group_id), (self._by_task, s.task_id)):
            table[key].remove(s.seq)
            if not table[key]:
                del table[key]
        self.text_bytes -= len(entry.text_z)
        for callback in self.on_evict:
            callback(entry)

    def get(self, seq: int) -> Entry | None:
        return self._by_seq.get(seq)

    def query(
        self, filt: TrajectoryFilter, *, max_seq: int | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[int, list[Summary]]:
        """``(total matching, one page)``, newest first, among rows with ``seq <= max_seq``."""
        total = 0
        page: list[Summary] = []
        for entry in reversed(self._rows):
            if max_seq is not None and entry.summary.seq > max_seq:
                continue
            if not filt.matches(entry.summary, entry.text):
                continue
            if offset <= total < offset + limit:
                page.append(entry.summary)
            total += 1
        return total, page

    def group(self, group_id: str) -> list[Summary]:
        return [self._by_seq[s].summary for s in self._by_group.get(group_id, [])]

    def attempts(self, task_id: str) -> list[Summary]:
        return [self._by_seq[s].summary for s in self._by_task.get(task_id, [])]
