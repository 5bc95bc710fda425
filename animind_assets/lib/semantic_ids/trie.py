"""Prefix trie over valid semantic IDs (as token-id sequences) for constrained generation.

Used with Hugging Face ``generate(prefix_allowed_tokens_fn=...)`` so beam search can only emit
semantic IDs that belong to a real item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class SidTrie:
    def __init__(self, sequences: Iterable[Sequence[int]] = (), end_token_id: int | None = None) -> None:
        self.root: dict[int, dict] = {}
        self.end_token_id = end_token_id
        self._items: dict[tuple[int, ...], object] = {}
        self.depth = 0
        for seq in sequences:
            self.add(seq)

    def add(self, seq: Sequence[int], item: object = None) -> None:
        """Add one path (``item`` is what ``item(path)`` returns). Without an end token a path that is a
        prefix of another would hide the longer one (decoding stops at the shorter): ValueError then."""
        seq = tuple(int(t) for t in seq)
        if self.end_token_id is not None:
            seq = seq + (self.end_token_id,)
        node = self.root
        for i, tok in enumerate(seq):
            if self.end_token_id is None and i and seq[:i] in self._items:
                raise ValueError(f"path of {item!r} extends the path of {self._items[seq[:i]]!r}: a trie without an end token needs prefix-free paths")
            node = node.setdefault(tok, {})
        if self.end_token_id is None and node and seq not in self._items:
            raise ValueError(f"path of {item!r} is a prefix of another path: a trie without an end token needs prefix-free paths")
        self._items[seq] = item
        self.depth = max(self.depth, len(seq))

    def __len__(self) -> int:
        return len(self._items)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix``; [] when the prefix is complete or invalid."""
        node = self.root
        for tok in prefix:
            node = node.get(int(tok))
            if node is None:
                return []
        return list(node.keys())

    def is_complete(self, seq: Sequence[int]) -> bool:
        return tuple(int(t) for t in seq) in self._items

    def item(self, seq: Sequence[int]) -> object:
        return self._items.get(tuple(int(t) for t in seq))

    def prefix_allowed_tokens_fn(self, prompt_len: int, fallback_token_id: int):
        """Build a ``prefix_allowed_tokens_fn`` for ``model.generate``.

        ``prompt_len`` is the number of prompt tokens for decoder-only models (0 for encoder-decoder
        models, whose decoder starts with the decoder start token: pass 1 then). Past a complete ID
        only ``fallback_token_id`` (EOS/pad) is allowed, so finished beams stay valid.
        """

        def fn(batch_id: int, input_ids) -> list[int]:
            generated = input_ids.tolist()[prompt_len:]
            allowed = self.allowed(generated)
            return allowed if allowed else [fallback_token_id]

        return fn
