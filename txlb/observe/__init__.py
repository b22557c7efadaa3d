"""
Watching txlb work: metrics, live stats, the event log, and adding up the workers' figures.
"""
