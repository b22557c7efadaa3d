"""
Running txlb from outside: the admin API and status page, config diffs for reload, the master-worker channel, the cluster, health-aware DNS and systemd notification.
"""
