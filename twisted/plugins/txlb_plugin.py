"""
Points C{twistd txlb} at L{txlb.tap}.
"""

from twisted.application.service import ServiceMaker

txlb = ServiceMaker(
    "txlb",
    "txlb.tap",
    "A programmable TCP and HTTP load balancer.",
    "txlb",
)
