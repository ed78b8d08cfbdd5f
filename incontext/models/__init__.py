"""Model directories (diffusers FluxKontextPipeline layout), the registry of model ids, and loading."""
