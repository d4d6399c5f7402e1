"""JSON Schemas of the files autotune writes (read with ``importlib.resources``)."""
