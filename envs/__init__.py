"""agentrl envs."""
