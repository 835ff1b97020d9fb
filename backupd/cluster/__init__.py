"""Redis Cluster: the slot map (`topology`), hash slots (`slots`) and the facts a cluster
backup's manifest records (`facts`)."""
