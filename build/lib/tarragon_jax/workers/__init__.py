"""The datapath: attention and expert workers and their stage-program callers, the forwarding
engine and routing table, transfers, runtimes (local device subsets, Ray processes), the
scheduler and the program log. Imports kv/ and below."""
