"""The chat server's internal modules, one concern each (README, "How it is built")."""
