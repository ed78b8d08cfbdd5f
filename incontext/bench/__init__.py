"""Benchmarks: `incontext bench quality` scores a model on a fixed held-out set.

heldout (the examples) → checks (success and PSNR of one edit) → quality (rows over the set)
→ report (report.md, results.json, grids); cli adds the `bench` command group.
"""
