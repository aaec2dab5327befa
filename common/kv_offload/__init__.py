"""CPU offload tier for the prefix cache, and the multi-connector composing it with the P/D transfer."""
