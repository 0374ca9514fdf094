"""avatar: text prompt -> rigged, textured 3D head for game engines.

Importing the package is cheap: torch, diffusers and the native extension are
loaded by the modules and commands that need them.
"""

__version__ = "0.1.0"
