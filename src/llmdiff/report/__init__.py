"""Report: renders comparison results and dump summaries. Knows nothing of how they were computed."""
