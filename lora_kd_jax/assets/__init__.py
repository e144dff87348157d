"""Files the package ships so it works offline: CoLA v1.1 (raw release files) and GPT-2's BPE tokenizer.

One place names them; `data.dir: ""` and `data.tokenizer: ""` (the defaults) resolve here.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
COLA_DIR = ASSETS / "cola"  # in_domain_train.tsv, in_domain_dev.tsv, out_of_domain_dev.tsv, README.cola_public
TOKENIZER_DIR = ASSETS / "gpt2_tokenizer"  # vocab.json, merges.txt
CONFIGS_DIR = ASSETS / "configs"  # the study's configs (the repository's configs/ links here), so reproduce works from a wheel

# sha256 of the files as released (CoLA v1.1 public archive; GPT-2's encoder files): tests check the copies.
SHA256 = {
    "cola/in_domain_train.tsv": "f320a10f92d3bce6b29152fde322a362eac39238e50d8de0c8815457fdf4fc12",
    "cola/in_domain_dev.tsv": "77176f6a03faa5a1c4f23c69971fc1bff565931112fb65af47b2d6e24b7f42f7",
    "cola/out_of_domain_dev.tsv": "201b9c57b2a20f1282242eec0ed8995729e3be19c29a46c047b3727338836c05",
    "gpt2_tokenizer/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2_tokenizer/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
