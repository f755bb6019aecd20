"""agentrl agents."""
