"""Checkpoints: atomic save/restore of train states, import/export of official weights."""
