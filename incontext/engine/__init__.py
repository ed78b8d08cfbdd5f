"""The serving engine: batches edit requests at denoising-step boundaries."""

from incontext.engine.protocol import EditRequest, EditResult, EngineClient, ProgressCallback

__all__ = ["EditRequest", "EditResult", "EngineClient", "ProgressCallback"]
