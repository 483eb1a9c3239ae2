"""Infer tasks: automatic (text), interactive (Slicer clicks) and OHIF's vista3d-style prompts."""
