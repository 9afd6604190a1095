"""Rare-token choice (DreamBooth): the identifier that will mean "this product".

Candidates are single tokens of the text encoder's CLIP BPE vocabulary that are rare (merged
late: high ids), lowercase letters only, not English words (the MiniLM WordPiece vocabulary
that ships with the sentence model serves as the dictionary), and at edit distance >= 2 from
every word of the product's title and type, so the token cannot be read as the product's name.
The order is a hash of the product id: deterministic, and different products try different
tokens. The sweep then tries the candidates with the most plausible association with the
product first (the paper: tokens "that have plausible association with the product"):
`by_association` ranks a shortlist by the CLIP text similarity of "a photo of <token> <class>"
to the product's title.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

RARE_ID_RANGE = (30000, 49406)  # late merges of the 49,408-token CLIP BPE (specials excluded)
LENGTHS = (3, 4)


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@lru_cache(maxsize=1)
def _pool() -> tuple[str, ...]:
    from open_clip.tokenizer import SimpleTokenizer

    from udfs.zoo import packaged_weights

    dictionary = {w.strip().lower() for w in (packaged_weights("sentence") / "vocab.txt").read_text().splitlines()
                  if w and not w.startswith("##") and not w.startswith("[")}
    pool = []
    for token, token_id in SimpleTokenizer().encoder.items():
        word = token[:-4] if token.endswith("</w>") else None
        if (word and RARE_ID_RANGE[0] <= token_id < RARE_ID_RANGE[1] and len(word) in LENGTHS
                and word.isascii() and word.isalpha() and word.islower() and word not in dictionary):
            pool.append(word)
    return tuple(sorted(pool))


def by_association(tokens: list[str], class_noun: str, title: str, embed_texts) -> list[tuple[str, float]]:
    """(token, cosine) best first: CLIP text similarity of "a photo of <token> <class>" to the
    product's title; `embed_texts` returns unit vectors. Ties keep the given order."""
    if not tokens:
        return []
    vectors = embed_texts([f"a photo of {t} {class_noun}" for t in tokens] + [title])
    similarity = vectors[:-1] @ vectors[-1]
    order = sorted(range(len(tokens)), key=lambda i: (-float(similarity[i]), i))
    return [(tokens[i], float(similarity[i])) for i in order]


def rare_token_candidates(product_id: str, name_words: list[str], count: int) -> list[str]:
    """`count` candidate tokens for a product, deterministic for the same inputs."""
    words = [w.lower() for w in name_words if w]
    allowed = [t for t in _pool() if all(edit_distance(t, w) >= 2 for w in words)]
    allowed.sort(key=lambda t: hashlib.sha256(f"{product_id}|{t}".encode()).hexdigest())
    return allowed[:count]
