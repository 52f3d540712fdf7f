"""Fault detection and recovery: inject.py (rehearsed faults), heartbeat.py (each rank's
watchdog), monitor.py (naming a crashed, hung or slow rank, in the launcher), snapshot.py
(in-memory snapshots in shared memory), session.py (the trainer's calls), launcher.py,
rendezvous.py and usage_errors.py (restarts under the elastic launcher)."""
