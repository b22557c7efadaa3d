"""
Choosing a server: pools and their servers, the schedulers, sticky sessions and where they are stored.
"""
