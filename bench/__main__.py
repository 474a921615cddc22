"""``python -m bench`` runs the whole benchmark (see run.py)."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
