"""agentrl trainer."""
