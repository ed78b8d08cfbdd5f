"""HTTP routes, one module per resource; each depends only on deps.py aliases."""
