"""The core every wing stands on: typed config, user-facing errors, named PRNG keys, metrics, logging, runtime."""
