"""Every test directory shares one kit (``tests/kit``): its fixtures are loaded here, once."""

pytest_plugins = ["kit.fixtures"]
