"""Allow ``python -m handyproxy``, the same entry point as the console script."""

from handyproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
