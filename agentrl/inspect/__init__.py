"""Read-only inspection of a run's trajectories: ``agentrl tail``, the web viewer, export and import.

Modules, from the bus up: :mod:`~agentrl.inspect.location` (which run), :mod:`~agentrl.inspect.source`
(connect without touching the run), :mod:`~agentrl.inspect.reader` (ordered, no-ack consumer),
:mod:`~agentrl.inspect.position` (``--from``), :mod:`~agentrl.inspect.summary` and
:mod:`~agentrl.inspect.filters` (rows and filters, pure), :mod:`~agentrl.inspect.formatting` (tail's
output), :mod:`~agentrl.inspect.rows` and :mod:`~agentrl.inspect.exchange` (export/import files), and the
viewer: :mod:`~agentrl.inspect.index`, :mod:`~agentrl.inspect.live`, :mod:`~agentrl.inspect.detail`,
:mod:`~agentrl.inspect.web`, :mod:`~agentrl.inspect.viewer` and ``static/``.
"""

from agentrl.inspect.filters import TrajectoryFilter, parse_filter
from agentrl.inspect.location import RunLocation, resolve_run
from agentrl.inspect.position import Start, parse_start
from agentrl.inspect.reader import TrajectoryReader, fetch_record
from agentrl.inspect.source import RunSource, open_run
from agentrl.inspect.summary import Record, Summary, summarize

__all__ = [
    "Record",
    "RunLocation",
    "RunSource",
    "Start",
    "Summary",
    "TrajectoryFilter",
    "TrajectoryReader",
    "fetch_record",
    "open_run",
    "parse_filter",
    "parse_start",
    "resolve_run",
    "summarize",
]
