"""
txlb: a programmable TCP and HTTP load balancer on Twisted.

The public surface is small: L{txlb.interfaces} for extension points
(schedulers, health checks, session stores) and the C{twistd txlb} command.
Everything else is an implementation detail and may change.
"""

__version__ = "0.1.0"
