"""Context extension: RoPE scaling for attention layers (`rope`), training-free length generalisation for Mamba-2
layers (`recurrent`), the extend recipe (`recipe`), the run with its training stages and before/after evals (`run`,
`report`) and `lctk extend` (`command`)."""
