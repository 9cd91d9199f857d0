"""The process a run lives in: the device (device), ranks (dist), seeds (seeds), and the
signals that stop a run (signals)."""
