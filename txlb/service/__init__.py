"""
The running process: the service tree built from a config
(L{txlb.service.tree}), made of the pieces L{txlb.service.build} builds and
the ports of L{txlb.service.ports}, changed in place by a reload
(L{txlb.service.apply}), and served by worker processes when
C{[txlb] workers > 1} (L{txlb.service.workers}, L{txlb.service.worker}).

This is the top of txlb's layers: it imports everything, and nothing in
txlb imports it but the command line (L{txlb.tap}) and the worker process.
"""

from txlb.service.apply import Reloaded
from txlb.service.build import buildPool
from txlb.service.ports import ListenError
from txlb.service.tree import TxlbService, settleHeap

__all__ = ["ListenError", "Reloaded", "TxlbService", "buildPool", "settleHeap"]
