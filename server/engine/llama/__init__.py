"""The llama.cpp engine: one scheduler thread per loaded model, continuous batching, sampling."""
