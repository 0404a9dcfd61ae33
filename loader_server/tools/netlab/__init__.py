"""A lab network for fault tests and the soak: two hosts in namespaces (hosts), faults on the link
between them (link: loss, partition, bandwidth cap), and a delaying TCP relay (relay)."""
