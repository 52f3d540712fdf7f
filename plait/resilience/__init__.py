"""Fault detection and recovery: inject.py (rehearsed faults), heartbeat.py (each rank's
watchdog), monitor.py (naming a crashed, hung or slow rank, in the launcher), snapshot.py
(in-memory snapshots in shared memory), session.py (the trainer's hooks), worker.py (a worker's
training with them), launcher.py and usage_errors.py (restarts under the local launcher),
elastic.py and elastic_launcher.py (elastic mode)."""
