"""Rendering: head-centric cameras, volume and mesh renderers, shading, control images."""
