"""Kernel I/O: nftables, policy routing and netns, run on netns workers.

pyroute2's package `__init__` imports every socket family it has, IPDB and NDB (about 8 MiB of
RSS); this layer uses its netlink message classes only. Deferring that `__init__` here, before any
module of the layer imports pyroute2, keeps the rest unloaded (`core.packageinit`); a name only
the `__init__` defines (`pyroute2.IPRoute`) still works, and loads it all.
"""

from ztunnel_redirect.core.packageinit import defer_package_init

defer_package_init("pyroute2")
