"""Developer tools that are not part of the server: run with `python -m mediaserver.tools.<name>`."""
