"""``agentrl view``: the same as ``agentrl inspect`` (the live web viewer)."""

from __future__ import annotations

from agentrl.commands import Command
from agentrl.commands.inspect import add_arguments, run

COMMAND = Command(name="view", help="alias of `agentrl inspect`", add_arguments=add_arguments, run=run)
