"""Workstation side of phi-edge: a Phi checkpoint in, a device artifact folder out.

Heavy dependencies (torch, transformers, the export tools) live only in this package and are
imported inside the functions that need them.
"""
