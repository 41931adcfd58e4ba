"""Separate hosts on one Linux machine: a network namespace per party, links with the bandwidth
and round-trip time of a hospital LAN or the internet (``medmpc.netlab.hosts``)."""
