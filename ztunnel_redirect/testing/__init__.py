"""Real test doubles shipped with the package, for the tests, the demo and the benchmark.

`netnslab` builds nodes and pods as network namespaces; the other modules here are stand-ins for
the parts of a cluster this machine does not have (API server, ztunnel).
"""
