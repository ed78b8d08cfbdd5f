"""The HTTP service: runs stored in a database, a dispatcher feeding the engine, callbacks.

One edit request, end to end:
routes/runs.py (validate, store input) → lifecycle.py (queued run row) → dispatcher.py
(claim, engine.edit) → storage.py (output files, signed URLs) → callbacks.py (signed POST).
"""
