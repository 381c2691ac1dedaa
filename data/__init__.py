"""Data: the embedded corpus, SentencePiece tokenizers, packing and the grain batch pipeline.

The train loop needs only `data.pipeline.make_iterator` and `data.config.default_config`.
"""
