"""The gateway as a process on a host: how it starts, is supervised, and stays within its means.

`workers` runs `workers = N` gateway processes on one port under a supervisor that refuses to
start beside another gateway; `lifeline` makes workers die with their supervisor (parent-death
signal, a lifeline pipe); `sdnotify` speaks systemd's readiness protocol (both ends: a worker
tells its supervisor, the supervisor tells systemd); `resources` checks and bounds the file
descriptors and heap memory the gateway needs. None of it is on the request path.
"""
