"""Low-communication training: gradient compression and infrequent synchronisation (issue 10)."""
