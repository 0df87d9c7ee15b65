"""The FAISS vector index of the search teams: chosen from size and budget, built from the Delta
embeddings in bounded memory (or sharded on Spark), tuned and measured, published as versions
with a CURRENT pointer, searched by product id, by a new product, or by vector with attribute
filters. See docs/index.md."""
