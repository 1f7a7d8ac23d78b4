"""The reward service protocol."""
