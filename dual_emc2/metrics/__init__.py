"""Evaluation metrics on plain arrays and tensors: linear probe and k-NN (probe.py, knn.py), FAISS search and
retrieval metrics (faiss_search.py, retrieval.py), representation geometry (geometry.py)."""
