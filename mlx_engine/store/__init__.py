"""Corpus-scale extraction: run a model over a corpus and keep every row of the hooks asked for.

`extract` (store/extract.py) writes an activation store, a folder readable without this
package (docs in store/layout.md); `ActivationStore` (store/reader.py) reads it back,
memory-mapped. Statistics are computed online during the pass (store/stats.py) and merge
across shards and ranks.

Nothing is imported here: `mlx-engine --help` builds the `extract` parser from
store/cli.py, which must stay light.
"""
