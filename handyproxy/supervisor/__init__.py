"""The master process and what it shares with its workers.

``master`` supervises (restarts, reloads, upgrades), ``channel`` carries messages to and from one
worker, ``table`` holds the instance-wide tunnel counts, ``control`` is the socket behind
``handyproxy -reload``. Workers run ``handyproxy.server``; this package imports it, never the
other way round except for the two leaves ``channel`` and ``table``.
"""
