"""The lab: what ``handyproxy demo``, the tests and the benchmark run the forwarder in.

None of it runs on a router: ``netns`` builds a throwaway topology of network namespaces,
``connect_proxy`` is a small CONNECT proxy to put in it (scriptable to misbehave), ``origin``
the servers a tunnel reaches, ``output`` waits for a line from any of them, and ``demo`` shows
a request crossing the lab. The forwarder's own modules never import this package (``cli``
loads ``demo`` only for the ``demo`` subcommand).
"""
