"""The test kit: one lab, one forwarder factory, one scriptable upstream, one origin.

Integration and reliability tests (and ``scripts/soak.py``) run the real forwarder in the
namespace lab of ``handyproxy.lab.netns`` and talk to it through sockets that live in the lab.
``fixtures`` holds the pytest fixtures (``tests/conftest.py`` loads it as a plugin); the other
modules hold what the fixtures hand out and what a test uses on the wire. ``tests/README.md``
shows how to write a test with it.
"""
