"""Engine adapters: the llama.cpp llama-server adapter, the process launcher, a tiny test model."""
