"""Evaluation metrics: the exact objective (exact.py), linear probe / k-NN (probe.py, knn.py), FAISS search and
retrieval metrics (faiss_search.py, retrieval.py)."""
