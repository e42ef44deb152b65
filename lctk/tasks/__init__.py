"""Sample generators shared by training data (lctk.data) and evals (lctk.evals), below both: the builtin corpus,
haystack texts, prompts fitted to an exact token budget with the model's own tokenizer, and the seeded passkey, NIAH
(RULER family + classic grid), RULER and recall (MQAR, text key-value) samples. See lctk.evals.api for examples."""
