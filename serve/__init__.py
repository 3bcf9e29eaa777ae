"""ganet.serve: the FastAPI classification service (issue 5 builds it)."""
