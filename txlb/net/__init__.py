"""
Sockets and bytes: splicing, the read loop, immediate writes, connecting, endpoint strings, TLS contexts, the PROXY protocol, and the one module that touches Twisted internals.
"""
