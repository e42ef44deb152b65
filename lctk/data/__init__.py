"""Data for training: tokenizers, text sources, the on-disk token store, synthetic tasks, packing (see each module;
the entry points are lctk.data.pipeline.load_tokenizer and prepare_data)."""
