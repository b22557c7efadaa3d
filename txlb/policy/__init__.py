"""
Traffic policy: what an operator says, in the config, about who may come
in, how fast, and what requests and responses look like on their way
through.  Each rule family has its own module, compiled once from the
config (at start and at each reload) into something the proxy consults
per request without parsing anything again.
"""
