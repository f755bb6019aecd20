"""Local-run launching: the supervisor, progress display and plots."""
