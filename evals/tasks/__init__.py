"""Sample generators, each seeded and built to an exact token budget with the model's tokenizer: passkey, niah
(RULER family + classic grid), recall (MQAR and text key-value recall). See lctk.evals for the API."""
