"""Benchmarks of Packetless against the tools a user would pick instead (tcplife-bpfcc, ss
polling): accuracy, overhead, capacity, latency and memory; ``bench/run`` runs them all.
"""
