"""Names and numbers that several stages must agree on, defined once.

Plain Python with no imports, so the lightest stage (tokenize, which never needs torch) and
the model code share them without pulling each other in.
"""

from __future__ import annotations

# The corpus's splits, in the order ingest assigns them and every report lists them.
SPLITS = ("train", "valid", "test")

# Fixed ids: the tokenizer is trained with these specials first, in this order, and the model
# relies on the ids (padding is masked out, <bos> starts every decode, <eos> ends it).
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

# The columns ingest writes to the corpus and tokenize to the token files; any other column of
# those files is one that ingest.keep_columns carried through (copied on, up to the embeddings).
CORPUS_COLUMNS = ("doc_id", "text", "split", "source")
TOKEN_COLUMNS = ("doc_id", "split", "ids", "n_tokens")

# The Parquet metadata key tokenize stamps on every token file: the sha256 of the tokenizer
# that made the ids. train, evaluate and embed refuse token files stamped with another one.
TOKENIZER_META_KEY = "vaepipe.tokenizer_sha256"

# A latent unit is active when the variance of its posterior mean over the data exceeds this
# (Burda et al. 2016); training's validation, evaluate and embed all count with it.
AU_THRESHOLD = 0.01
