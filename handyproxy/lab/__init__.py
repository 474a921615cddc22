"""The lab: what ``handyproxy demo``, the tests and the benchmark run the forwarder in.

None of it runs on a router: ``netns`` builds a throwaway topology of network namespaces,
``connect_proxy`` is a small CONNECT proxy to put in it, and ``demo`` shows a request crossing
it. The forwarder's own modules never import this package.
"""
