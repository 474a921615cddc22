"""The HandyProxy benchmark: ``sudo .venv/bin/python -m bench`` (see bench/README.md)."""
