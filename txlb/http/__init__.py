"""
The HTTP/1.1 reverse proxy.

L{txlb.http.frontend} speaks to clients, L{txlb.http.backend} to servers
and keeps their idle connections, L{txlb.http.headers} rewrites header
blocks, L{txlb.http.routing} picks a pool per request, and
L{txlb.http.errors} writes the JSON error responses.  Parsing is done by
httptools (llhttp), in its strict mode, plus the few checks it leaves to us.
"""
