"""Simulated multi-host clusters on one Linux machine (network namespaces, shaped links, cgroups).

``SimCluster(spec).up()`` builds hosts as network namespaces joined by a LAN
bridge and point-to-point cables with rate, delay and loss, starts a node in
each, and links this machine (the root namespace) into the LAN, so that
``sim.cluster()`` reaches every node and worker directly; ``down()`` removes
all of it. Needs root and iproute2. See
:mod:`exo_lab.sim.spec` for the spec format and :mod:`exo_lab.sim.layout` for
names and addresses.
"""

from exo_lab.sim.cluster import SimCluster, SimError, down, down_all, list_sims
from exo_lab.sim.layout import HostLink, SimHost
from exo_lab.sim.spec import HostSpec, LanSpec, LinkSpec, SimSpec, SpecError

__all__ = [
    "HostLink",
    "HostSpec",
    "LanSpec",
    "LinkSpec",
    "SimCluster",
    "SimError",
    "SimHost",
    "SimSpec",
    "SpecError",
    "down",
    "down_all",
    "list_sims",
]
