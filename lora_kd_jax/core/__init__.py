"""The core every wing stands on: typed config, user-facing errors, named PRNG keys, metrics, dtypes per backend,
GPT-2's layout as plain data, the log format."""
