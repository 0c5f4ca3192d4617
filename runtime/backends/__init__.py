"""Backends: one file each; each imports its heavy library only when constructed."""
