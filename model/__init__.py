"""The models: MOON3.0 (product embeddings) and, later, Creative4U (creative selection).

Heavy imports (torch, transformers) happen in the submodules, never here.
"""
