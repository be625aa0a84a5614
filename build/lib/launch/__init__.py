"""absl launchers: run as `python -m launch.<name>` from the repository root."""
