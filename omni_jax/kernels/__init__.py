"""Kernels behind one door each: `<op>/api.py` dispatches to a pure-JAX reference or a Pallas implementation."""
