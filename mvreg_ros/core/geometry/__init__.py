"""Frames, rigid transforms and the C-arm kinematic model (one owner for every convention)."""
