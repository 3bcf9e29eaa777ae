"""ganet.serve: the FastAPI classification service."""
