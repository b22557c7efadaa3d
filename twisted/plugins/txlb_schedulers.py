"""
txlb's built-in scheduling algorithms, registered as plugins like any other.
"""

from txlb.schedulers import BUILTINS

globals().update({f"scheduler_{f.name}": f for f in BUILTINS})
