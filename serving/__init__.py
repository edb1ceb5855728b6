"""HTTP serving of ExplicitLM: a FastAPI app under uvicorn or Ray Serve."""
