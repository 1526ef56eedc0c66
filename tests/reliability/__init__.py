"""Reliability suite: chaos, partition, bad input, auth, secrets, disk and bounds."""
